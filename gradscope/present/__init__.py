"""Presenting a Report: the terminal (rich), the HTML report (matplotlib), the machine formats, and
the words they share. Never imports torch (a test keeps it so).
"""
