"""Training on the host: the built-in classifier, fine-tuning, the backbone/head split, the numpy
head trainer and input-shape adaptation.

Modules: ``classifier``, ``backbones``, ``finetune``, ``finetune_keras``, ``head_training``, ``model_split``, ``input_adaptation``, ``finetune_data``, ``finetune_backbone``, ``multi_worker_training``. The public names are re-exported lazily by :mod:`edgeadapt`.
"""
