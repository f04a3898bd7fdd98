"""Advising: judging the trials and turning findings and trials into a recommendation and its code
snippets.
"""
