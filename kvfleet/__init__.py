"""kvfleet: prefix-cache-aware GPU fleet orchestration for LLM inference.

The installed package joins the repository's folders into one namespace:
``kvfleet.controller`` (controller/), ``kvfleet.node_agent`` (node_agent/), and the
code both sides share here: canonical block hashing, tokenizers, generated wire code
(``kvfleet.v1``) and the CLI.
"""

__version__ = "0.1.0"
