"""Long-story memory around the pure prompt builder: what a prompt recalls, and the background
work (embeddings for recall, rolling summaries) that never runs on the reply path."""

from bot.memory.context import StoryMemory
from bot.memory.worker import MemoryWorker

__all__ = ["MemoryWorker", "StoryMemory"]
