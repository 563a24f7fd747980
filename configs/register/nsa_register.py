"""``--register_path`` shim for MindFormers' ``run_mindformer.py``: importing it registers nsa-layers'
MindFormers classes (``NSAQwen3Config``, ``NSAQwen3ForCausalLM``, ``NSATrainOneStepCell``).

A YAML names it with ``model: {model_config: {auto_register: nsa_register.NSAQwen3Config, ...}}``;
MindFormers then imports this file from the ``--register_path`` folder (``REGISTER_PATH``).
"""

from nsa_layers.mindformers import NSAQwen3Config, NSAQwen3ForCausalLM, NSATrainOneStepCell  # noqa: F401
