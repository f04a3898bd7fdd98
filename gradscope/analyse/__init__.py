"""Analysing: the Profile a Monitor produces, the statistics and metrics computed from it, the rule
language and the findings the rules give. Pure data and numpy: no torch.
"""
