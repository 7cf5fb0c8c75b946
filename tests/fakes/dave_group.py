"""A real DAVE group (Discord's end-to-end encryption, MLS) of the bot and one speaker, formed offline.

For tests and benchmarks of the receive path's DAVE layer, with davey's own session objects.
"""

from __future__ import annotations

import struct

import davey
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DAVE_CHANNEL_ID = 927310423890473011
DAVE_BOT_ID = 111
DAVE_SPEAKER_ID = 222


def _vec(data: bytes) -> bytes:
    """An MLS variable-length vector (RFC 9420 §2.1.2)."""
    n = len(data)
    if n < 64:
        return bytes([n]) + data
    if n < 16384:
        return struct.pack(">H", 0x4000 | n) + data
    return struct.pack(">I", 0x80000000 | n) + data


def dave_pair() -> tuple[davey.DaveSession, davey.DaveSession]:
    """Two real davey sessions in one MLS group, formed offline.

    We play Discord's voice server: a P-256 external sender (op 25) and one Add proposal
    for the speaker's key package (op 27), an MLS PublicMessage from an external sender
    signed with SignWithLabel("FramedContentTBS"). The bot's session commits it; the
    speaker's session joins with the welcome (op 30). Returns (bot, speaker).
    """
    signer = ec.generate_private_key(ec.SECP256R1())
    public = signer.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
    external_sender = _vec(public) + struct.pack(">H", 1) + _vec(b"\x00")  # basic credential
    bot = davey.DaveSession(1, DAVE_BOT_ID, DAVE_CHANNEL_ID)
    speaker = davey.DaveSession(1, DAVE_SPEAKER_ID, DAVE_CHANNEL_ID)
    for s in (bot, speaker):
        s.set_external_sender(external_sender)
    bot.get_serialized_key_package()
    key_package = speaker.get_serialized_key_package()
    content = (_vec(struct.pack(">Q", DAVE_CHANNEL_ID)) + struct.pack(">Q", 0)  # group id, epoch 0
               + struct.pack(">BI", 2, 0) + _vec(b"")  # sender: external #0; no authenticated data
               + bytes([2]) + struct.pack(">H", 1) + key_package)  # a proposal: Add
    tbs = struct.pack(">HH", 1, 1) + content  # mls10, public message
    signature = signer.sign(_vec(b"MLS 1.0 FramedContentTBS") + _vec(tbs), ec.ECDSA(hashes.SHA256()))
    proposals = _vec(tbs + _vec(signature))
    commit_welcome = bot.process_proposals(davey.ProposalsOperationType.append, proposals)
    assert commit_welcome is not None and commit_welcome.welcome
    bot.process_commit(commit_welcome.commit)
    speaker.process_welcome(commit_welcome.welcome)
    assert bot.ready and speaker.ready
    return bot, speaker
