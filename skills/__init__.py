"""chinwag's built-in skills. Each module is a plugin listed in the ``chinwag`` entry-point
group, exactly as a third-party plugin would be; nothing in ``bot`` imports them by name."""
