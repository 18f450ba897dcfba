"""The experiments read Fashion-MNIST by its own name (kdfast.data.load("fashion-mnist"), its
normalisation and class names), and a cached teacher is never reused for differently normalised data."""
import copy
import os

import pytest

from kdfast.experiments import common

FASHION = "/usr/share/datasets/fashion-mnist"


def test_teacher_key_depends_on_the_normalisation():
    train, _ = common.digits(16, 32, 8)
    other = copy.copy(train)
    other.mean, other.std = (0.1307,), (0.3081,)
    recipe = {"epochs": 8, "lr": 0.05}
    assert common.teacher_key("fashion-mnist", train, "vgg8", 0.25, 0, recipe) != \
        common.teacher_key("fashion-mnist", other, "vgg8", 0.25, 0, recipe)


@pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION, "t10k-labels-idx1-ubyte.gz")),
                    reason=f"Fashion-MNIST is not installed in {FASHION}: apt-get install dataset-fashion-mnist")
def test_experiments_load_fashion_mnist_by_its_name():
    train, test = common.load_data("fashion-mnist", train_subset=50, test_subset=20)
    assert train.name == test.name == "fashion-mnist" and train.classes[0] == "T-shirt/top"
    assert train.mean == (0.2860406,) and len(train) == 50 and len(test) == 20
