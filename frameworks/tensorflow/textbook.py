"""The Keras training loop as the textbook writes it, for the throughput benchmark.

`model.compile(SGD, SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])`
then `model.fit` over the in-memory arrays, with the same scratch BatchNorm in
the same BN-LeNet. The first steps are excluded from the timing (callbacks).
"""

import time

import keras
import numpy as np

from common.init import init_params
from common.layout import nchw_to_nhwc

from .backend import TensorFlowBackend

DESCRIPTION = "textbook loop: Keras model.compile + model.fit over in-memory arrays"


class _Timer(keras.callbacks.Callback):
    def __init__(self, warmup_steps):
        super().__init__()
        self.warmup_steps, self.start, self.end, self.steps = warmup_steps, None, None, 0

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.warmup_steps:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps = batch + 1

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()


def examples_per_second(config, dataset, warmup_steps=5):
    backend = TensorFlowBackend(config)  # the same BNLeNet
    backend.set_params(init_params(config.model, config.seed, config.dtype))
    model = backend.model
    n = config.train_limit or len(dataset.train_labels)
    n -= n % config.batch_size  # whole batches, as the suite
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=config.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = _Timer(warmup_steps)
    model.fit(
        nchw_to_nhwc(dataset.train_images[:n]),
        dataset.train_labels[:n].astype(np.int32),
        batch_size=config.batch_size,
        epochs=1,
        shuffle=True,
        verbose=0,
        callbacks=[timer],
    )
    return (timer.steps - warmup_steps) * config.batch_size / (timer.end - timer.start)
