"""Local fakes of the services the bot talks to: an OpenAI-shaped engine and a Discord server.

They are real servers on loopback ports, so the bot's real clients (the official `openai`
package, discord.py's HTTP and gateway code) run unchanged against them.
"""
