"""Training and evaluation workflow: data sets, the training loop, checkpoints, multi-process training.

Submodules are imported on use: ``resnet-fast``'s parser imports ``cli_train`` and
``cli_eval`` only, and neither pulls in scikit-learn, torchvision or tqdm until a
command runs.

* :mod:`resnet_fast.train.data`: bundled digits, CIFAR-10 python batches, image folders.
* :mod:`resnet_fast.train.config`: :class:`~resnet_fast.train.config.TrainConfig`, ``check_config``, ``check_amp``.
* :mod:`resnet_fast.train.sampling`: the samplers and data loaders.
* :mod:`resnet_fast.train.steps`: the steps of a run (resume checks, model and DDP wrapper, one epoch,
  the checkpoint payload).
* :mod:`resnet_fast.train.loop`: ``train()`` (the steps in order), ``evaluate()``.
* :mod:`resnet_fast.train.checkpoint`: atomic saves; torchvision <-> FastResNet weights.
* :mod:`resnet_fast.train.distributed`: torchrun setup; ``enable_sync_bn`` (sync-BN on the fused path).
"""
