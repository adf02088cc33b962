"""What agent.py, supervisor.py and storage.py share, one job per module; importing it does nothing.

``startup`` is imported first by every script; each module's docstring says what it holds.
"""
