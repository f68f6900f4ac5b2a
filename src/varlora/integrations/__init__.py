"""IVON inside other people's training loops: :class:`IVONTrainer` for Hugging Face ``transformers.Trainer``.

Loops of other frameworks can use :meth:`varlora.IVON.begin_sample`/:meth:`~varlora.IVON.end_sample` (a sample
whose body spans several hooks) and :meth:`~varlora.IVON.draw_noise` (samples interleaved over micro-batches).
"""

from varlora.integrations.hf_trainer import IVONTrainer, unwrap_ivon

__all__ = ["IVONTrainer", "unwrap_ivon"]
