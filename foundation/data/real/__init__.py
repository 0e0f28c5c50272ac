"""Converters of public datasets into recfm raw logs: see :mod:`recfm.foundation.data.real.convert`.

One module per dataset (``ml1m``, ``beauty``, ``douban``, ``retailrocket``, ``ml100k``), each stating its
choices in its docstring; ``textio`` reads text files with line-numbered errors; ``sequences`` holds the
next-item sequence rules. Configs for the converted logs live in ``configs/real/<dataset>/``.
"""
