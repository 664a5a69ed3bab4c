"""Choosing what to remove: the depth and sublayer planners (``planner``) and the width/mixed planners
(``width``).

Layer: may import ``scoring`` and everything below it.
"""
