"""Model files on disk: the catalogue of what MagiHuman needs (source, folder, size), downloading it, and
reading ``.pth``/``.ckpt`` torch files without running pickled code.

May import ``...fp8`` only; nothing else of ``pipeline/``.
"""
