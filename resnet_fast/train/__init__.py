"""Training and evaluation workflow: data sets, the training loop, checkpoints, multi-process training.

Submodules are imported on use: ``resnet-fast``'s parser imports ``cli_train`` and
``cli_eval`` only, and neither pulls in scikit-learn, torchvision or tqdm until a
command runs.

* :mod:`resnet_fast.train.data`: bundled digits, CIFAR-10 python batches, image folders.
* :mod:`resnet_fast.train.loop`: :class:`~resnet_fast.train.loop.TrainConfig`, ``train()``, ``evaluate()``.
* :mod:`resnet_fast.train.checkpoint`: atomic saves; torchvision <-> FastResNet weights.
* :mod:`resnet_fast.train.distributed`: torchrun setup; ``enable_sync_bn`` (sync-BN on the fused path).
"""
