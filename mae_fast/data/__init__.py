"""Pretraining data: image files -> augmented, normalised batches on the training device.

Two loaders give the same samples (the same images, RandomResizedCrop boxes and flips, keyed by each
sample's position in the data stream; pixels within one 8-bit level where the JPEG decoders agree):

- the CPU loader (``cpu_folder``): Pillow decodes and resizes in loader workers, uint8 crosses to the device;
- the GPU loader (``gpu_folder`` + ``device_decode``): workers only read files, nvJPEG decodes on the GPU and
  one Triton kernel (``mae_fast.ops.resized_crop``) crops, resizes, flips and normalises the batch.

``Batches`` (``loader``) runs either. It can ship each sample's mask noise (``masks``), keyed by its
position like its crop, so that a sample's mask does not depend on the process that trains it.
docs/PRETRAIN.md: what each loader does, the measured agreement, and which files are converted or skipped.
"""
from .cpu_folder import CACHE_MAX_IMAGES, ImageFolder, LevelBatch, Sample, collate_levels
from .crop import Box, center_box, crop_and_flip, random_resized_crop_box, sample_generator
from .decode import UnreadableImage, decode_rgb, load_rgb, to_rgb
from .device_decode import DeviceDecoder, nvjpeg_decoder, pillow_decoder
from .files import IMAGE_EXTENSIONS, find_images, sample_images
from .gpu_folder import Encoded, EncodedBatch, EncodedFolder, EncodedSample, collate_encoded, read_encoded
from .jpeg import JpegInfo, jpeg_info
from .loader import LOADERS, Batches, default_workers, resolve_loader
from .masks import CollateWithNoise, WithNoise, mask_noise, noise_generator
from .normalize import IMAGENET_MEAN, IMAGENET_STD, normalize, to_levels, to_pixels, to_tensor
from .sampler import StreamSampler
from .skips import SkipLog, Skipped, first_readable

__all__ = [
    "Batches", "Box", "CACHE_MAX_IMAGES", "CollateWithNoise", "DeviceDecoder", "Encoded", "EncodedBatch",
    "EncodedFolder", "EncodedSample", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "ImageFolder", "JpegInfo",
    "LOADERS", "LevelBatch", "Sample", "SkipLog", "Skipped", "StreamSampler", "UnreadableImage", "WithNoise",
    "center_box", "collate_encoded", "collate_levels", "crop_and_flip", "decode_rgb", "default_workers",
    "find_images", "first_readable", "jpeg_info", "load_rgb", "mask_noise", "noise_generator", "normalize",
    "nvjpeg_decoder", "pillow_decoder", "random_resized_crop_box", "read_encoded", "resolve_loader",
    "sample_generator", "sample_images", "to_levels", "to_pixels", "to_rgb", "to_tensor",
]
