"""Masque Discord bot: slash commands, story state, prompt building, webhooks."""
