"""Built-in character cards (data only; shipped in the wheel as bot.builtin_personas)."""
