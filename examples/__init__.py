"""Examples of using tunewise from outside the package (see README, "Bring your own trainer")."""
