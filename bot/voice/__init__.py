"""Voice: voice messages out (notes), and voice-channel role-play (receiver, turns, playback, session).

See ../shared/VOICE.md in the design notes and the README's Voice section.
"""
