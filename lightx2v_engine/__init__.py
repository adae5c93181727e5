"""lightx2v-engine: fast 4-step Wan2.1 video generation."""

__version__ = "0.1.0"
