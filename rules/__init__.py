"""Rule files shipped inside the gradscope wheel (as ``gradscope.rules``); default.yaml is the default set."""
