"""The DAG-build check of an explicit ``train.attention`` against what the model supports.

A module of its own, imported only by the Snakefile: its imports of torch and transformers (inside the function, on a
cache miss) would otherwise count as code of every stage that imports it (vectorlm/fingerprint.py follows imports),
and an edit anywhere under vectorlm/model.py would rerun tokenize.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from vectorlm.config import Config, ConfigError


def check_attention(config: Config, *, cache: str | Path, model_digest: str) -> None:
    """An explicit train.attention that the model does not support (Gemma-2 and sdpa, GPT-2 and flex attention) fails
    here, naming the ones it supports. Finding them imports torch and transformers (seconds), so the answer is kept in
    ``cache`` per model (``model_digest``) and transformers version; auto needs no check (it picks among them)."""
    requested = config.train.attention
    if requested == "auto" or not Path(config.model).is_dir():  # the example model is built by the workflow
        return
    key = f"{model_digest} {config.trust_remote_code} transformers {importlib.metadata.version('transformers')}"
    cache = Path(cache)
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in stored:
        from vectorlm.attention import supported_attention
        from vectorlm.model import causal_lm_class

        model_class = causal_lm_class(config.model, trust_remote_code=config.trust_remote_code)
        stored = {key: {"class": model_class.__name__, "supported": list(supported_attention(model_class))}}
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(stored))
        partial.replace(cache)
    if requested not in stored[key]["supported"]:
        from vectorlm.attention import unsupported_attention

        raise ConfigError(unsupported_attention(requested, stored[key]["class"], stored[key]["supported"]))
