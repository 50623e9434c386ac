"Careless data files: MNIST whose label file and image file disagree in length are named in the error."
import struct
import pytest, torch
from fastsprkd.data import mnist_dls


def _write_idx(path, arr, magic):
    with open(path, 'wb') as f:
        f.write(struct.pack('>I', magic) + b''.join(struct.pack('>I', s) for s in arr.shape))
        f.write(arr.numpy().astype('uint8').tobytes())


@pytest.mark.parametrize('split,labels', [('train', 70), ('train', 90), ('t10k', 20)])
def test_mnist_label_file_of_another_length_is_named(tmp_path, split, labels):
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for s, n in (('train', 80), ('t10k', 32)):
        _write_idx(raw/f'{s}-images-idx3-ubyte', torch.randint(0, 256, (n, 28, 28), generator=g), 0x803)
        _write_idx(raw/f'{s}-labels-idx1-ubyte', torch.randint(0, 10, (labels if s == split else n,), generator=g), 0x801)
    images = 80 if split == 'train' else 32
    with pytest.raises(ValueError, match=rf"corrupt MNIST files: .*{split}-labels-idx1-ubyte holds {labels} labels but "
                                         rf".*{split}-images-idx3-ubyte holds {images} images"):
        mnist_dls(tmp_path, bs=16)
