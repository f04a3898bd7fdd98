#!/bin/sh
# The README's picture: the HTML report of samples/lstm_lm.py, screenshotted by headless Chromium.
# Needs Debian's chromium (apt-get install chromium) and gradscope[html]. Run: sh docs/screenshot.sh
set -eu
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# exit code 1 is the expected verdict here (the sample diverges); 2 or more is a real failure
python -m gradscope diagnose samples/lstm_lm.py --html "$work/report.html" --format json > "$work/report.json" \
    || [ $? -eq 1 ]
# the flags keep Chromium off the network (none is reachable here) and out of the user's profile
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$work/profile" \
    --window-size=1100,2200 --screenshot="$work/report.png" "file://$work/report.html" 2>/dev/null
mv "$work/report.png" docs/report.png
echo "wrote docs/report.png"
