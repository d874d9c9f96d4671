"""
GlimpseError: the one exception glimpse's library raises for what the person running it can fix (a
missing file, a bad config key, a checkpoint that does not fit), its message one line that says what is
wrong, where, and what to do.

It is a SystemExit, so a script needs no handler of its own: uncaught, Python prints exactly that line
(no traceback) and exits with status 1. A notebook or a test catches it by name: `except GlimpseError`.
model.py and lora.py import nothing of glimpse: they raise ValueError for a misuse of their modules, and
lora.merge_lora a plain SystemExit for a 4-bit base it was not asked to dequantise.
"""


class GlimpseError(SystemExit):
    pass
