//! The Inception-v3 that FID is defined with: pytorch-fid 0.3.0's `InceptionV3([3])`
//! (pytorch_fid/inception.py), i.e. torchvision's `Inception3` with the FID blocks `FIDInceptionA`,
//! `FIDInceptionC`, `FIDInceptionE_1`, `FIDInceptionE_2` and the TensorFlow 2015-12-05 weights
//! (`pt_inception-2015-12-05-6726825d.pth`, converted once by scripts/convert_inception.py). Parameter
//! names are the checkpoint's, verbatim: `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch_pool.bn.running_var`.
//!
//! The forward is pytorch-fid's: bilinear resize to 299×299 (align_corners=False, no antialiasing),
//! scale [0, 1] → [-1, 1], blocks 0–3, global average pool → the 2048-d pool3 features.

use crate::backend::ConvBackend;
use crate::models::layers::conv2d;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// The side pytorch-fid resizes every image to.
pub const INPUT_SIZE: usize = 299;
/// Length of the pool3 feature vector.
pub const FEATURES: usize = 2048;
/// torchvision's `BasicConv2d`: `BatchNorm2d(out_channels, eps=0.001)`.
const BN_EPS: f64 = 0.001;

// ---- BasicConv2d -------------------------------------------------------------------------------

/// torchvision's `BasicConv2d`: conv (no bias) → BatchNorm (eval: running statistics) → ReLU.
///
/// The BatchNorm is folded into the convolution at load time (weight × γ/√(var+ε), bias β − mean·γ/√(var+ε)):
/// the same affine map, one pass instead of two; it moves results by float rounding only.
struct BasicConv2d {
    weight: Tensor,
    bias: Tensor,
    /// (rows, columns) of zero padding; may differ for the 1×7 / 7×1 kernels.
    padding: (usize, usize),
    stride: usize,
    backend: ConvBackend,
}

impl BasicConv2d {
    fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize),
        padding: (usize, usize),
        stride: usize,
        backend: ConvBackend,
    ) -> Result<Self> {
        let weight = vb.pp("conv").get((c_out, c_in, kernel.0, kernel.1), "weight")?;
        let bn = vb.pp("bn");
        let gamma = bn.get(c_out, "weight")?.to_dtype(DType::F64)?;
        let beta = bn.get(c_out, "bias")?.to_dtype(DType::F64)?;
        let mean = bn.get(c_out, "running_mean")?.to_dtype(DType::F64)?;
        let var = bn.get(c_out, "running_var")?.to_dtype(DType::F64)?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?; // (c_out), in f64 so folding adds no error of its own
        let dtype = weight.dtype();
        let weight = weight.to_dtype(DType::F64)?.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?.to_dtype(dtype)?;
        let bias = (beta - (mean * &scale)?)?.to_dtype(dtype)?;
        Ok(Self { weight, bias, padding, stride, backend })
    }
}

impl Module for BasicConv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        let ys = if kh == kw && self.padding.0 == self.padding.1 {
            conv2d(self.backend, xs, &self.weight, Some(&self.bias), self.padding.0, self.stride)?
        } else {
            // candle pads both sides alike; the factorised 1×n / n×1 kernels pad one axis only.
            let xs = xs.pad_with_zeros(2, self.padding.0, self.padding.0)?;
            let xs = xs.pad_with_zeros(3, self.padding.1, self.padding.1)?;
            xs.conv2d(&self.weight, 0, self.stride, 1, 1)?.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?
        };
        ys.relu()
    }
}

/// A square kernel with square padding and stride 1.
fn basic(
    vb: &VarBuilder,
    name: &str,
    c_in: usize,
    c_out: usize,
    k: usize,
    p: usize,
    b: ConvBackend,
) -> Result<BasicConv2d> {
    BasicConv2d::new(vb.pp(name), c_in, c_out, (k, k), (p, p), 1, b)
}

// ---- pooling -----------------------------------------------------------------------------------

/// `F.max_pool2d(x, kernel_size=3, stride=2)`: no padding, floor mode.
fn max_pool_3x3_s2(xs: &Tensor) -> Result<Tensor> {
    xs.max_pool2d_with_stride(3, 2)
}

/// `F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)`: pytorch-fid's patch
/// ("TensorFlow's average pool does not use the padded zeros"), so each sum is divided by the number of
/// real pixels under the window: 4 in corners, 6 on edges, 9 inside.
fn avg_pool_3x3_exclude_pad(xs: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let sums = (xs.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)? * 9.0)?;
    let count = |i: usize, n: usize| {
        if n == 1 {
            1.0
        } else if i == 0 || i == n - 1 {
            2.0
        } else {
            3.0
        }
    };
    let counts: Vec<f32> = (0..h).flat_map(|y| (0..w).map(move |x| (count(y, h) * count(x, w)) as f32)).collect();
    let counts = Tensor::from_vec(counts, (1, 1, h, w), xs.device())?.to_dtype(xs.dtype())?;
    sums.broadcast_div(&counts)
}

/// `F.max_pool2d(x, kernel_size=3, stride=1, padding=1)` (FIDInceptionE_2): padding counts as -∞.
fn max_pool_3x3_s1_pad1(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let rows = Tensor::full(f32::NEG_INFINITY, (b, c, 1, w), xs.device())?.to_dtype(xs.dtype())?;
    let xs = Tensor::cat(&[&rows, xs, &rows], 2)?; // (b, c, h + 2, w)
    let cols = Tensor::full(f32::NEG_INFINITY, (b, c, h + 2, 1), xs.device())?.to_dtype(xs.dtype())?;
    Tensor::cat(&[&cols, &xs, &cols], 3)?.max_pool2d_with_stride(3, 1)
}

// ---- the mixed blocks --------------------------------------------------------------------------

/// `FIDInceptionA` (Mixed_5b/c/d).
struct InceptionA {
    branch1x1: BasicConv2d,
    branch5x5_1: BasicConv2d,
    branch5x5_2: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionA {
    fn new(vb: VarBuilder, c_in: usize, pool_features: usize, b: ConvBackend) -> Result<Self> {
        Ok(Self {
            branch1x1: basic(&vb, "branch1x1", c_in, 64, 1, 0, b)?,
            branch5x5_1: basic(&vb, "branch5x5_1", c_in, 48, 1, 0, b)?,
            branch5x5_2: basic(&vb, "branch5x5_2", 48, 64, 5, 2, b)?,
            branch3x3dbl_1: basic(&vb, "branch3x3dbl_1", c_in, 64, 1, 0, b)?,
            branch3x3dbl_2: basic(&vb, "branch3x3dbl_2", 64, 96, 3, 1, b)?,
            branch3x3dbl_3: basic(&vb, "branch3x3dbl_3", 96, 96, 3, 1, b)?,
            branch_pool: basic(&vb, "branch_pool", c_in, pool_features, 1, 0, b)?,
        })
    }
}

impl Module for InceptionA {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let branch1x1 = self.branch1x1.forward(xs)?;
        let branch5x5 = xs.apply(&self.branch5x5_1)?.apply(&self.branch5x5_2)?;
        let branch3x3dbl = xs.apply(&self.branch3x3dbl_1)?.apply(&self.branch3x3dbl_2)?.apply(&self.branch3x3dbl_3)?;
        let branch_pool = avg_pool_3x3_exclude_pad(xs)?.apply(&self.branch_pool)?;
        Tensor::cat(&[branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)
    }
}

/// torchvision's `InceptionB` (Mixed_6a), unpatched by pytorch-fid.
struct InceptionB {
    branch3x3: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
}

impl InceptionB {
    fn new(vb: VarBuilder, c_in: usize, b: ConvBackend) -> Result<Self> {
        Ok(Self {
            branch3x3: BasicConv2d::new(vb.pp("branch3x3"), c_in, 384, (3, 3), (0, 0), 2, b)?,
            branch3x3dbl_1: basic(&vb, "branch3x3dbl_1", c_in, 64, 1, 0, b)?,
            branch3x3dbl_2: basic(&vb, "branch3x3dbl_2", 64, 96, 3, 1, b)?,
            branch3x3dbl_3: BasicConv2d::new(vb.pp("branch3x3dbl_3"), 96, 96, (3, 3), (0, 0), 2, b)?,
        })
    }
}

impl Module for InceptionB {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let branch3x3 = self.branch3x3.forward(xs)?;
        let branch3x3dbl = xs.apply(&self.branch3x3dbl_1)?.apply(&self.branch3x3dbl_2)?.apply(&self.branch3x3dbl_3)?;
        let branch_pool = max_pool_3x3_s2(xs)?;
        Tensor::cat(&[branch3x3, branch3x3dbl, branch_pool], 1)
    }
}

/// `FIDInceptionC` (Mixed_6b/c/d/e): 7×7 convolutions factorised into 1×7 and 7×1.
struct InceptionC {
    branch1x1: BasicConv2d,
    branch7x7_1: BasicConv2d,
    branch7x7_2: BasicConv2d,
    branch7x7_3: BasicConv2d,
    branch7x7dbl_1: BasicConv2d,
    branch7x7dbl_2: BasicConv2d,
    branch7x7dbl_3: BasicConv2d,
    branch7x7dbl_4: BasicConv2d,
    branch7x7dbl_5: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionC {
    fn new(vb: VarBuilder, c_in: usize, c7: usize, b: ConvBackend) -> Result<Self> {
        let conv = |name: &str, c_in, c_out, kernel, padding| {
            BasicConv2d::new(vb.pp(name), c_in, c_out, kernel, padding, 1, b)
        };
        let (k1x7, p1x7, k7x1, p7x1) = ((1, 7), (0, 3), (7, 1), (3, 0));
        Ok(Self {
            branch1x1: conv("branch1x1", c_in, 192, (1, 1), (0, 0))?,
            branch7x7_1: conv("branch7x7_1", c_in, c7, (1, 1), (0, 0))?,
            branch7x7_2: conv("branch7x7_2", c7, c7, k1x7, p1x7)?,
            branch7x7_3: conv("branch7x7_3", c7, 192, k7x1, p7x1)?,
            branch7x7dbl_1: conv("branch7x7dbl_1", c_in, c7, (1, 1), (0, 0))?,
            branch7x7dbl_2: conv("branch7x7dbl_2", c7, c7, k7x1, p7x1)?,
            branch7x7dbl_3: conv("branch7x7dbl_3", c7, c7, k1x7, p1x7)?,
            branch7x7dbl_4: conv("branch7x7dbl_4", c7, c7, k7x1, p7x1)?,
            branch7x7dbl_5: conv("branch7x7dbl_5", c7, 192, k1x7, p1x7)?,
            branch_pool: conv("branch_pool", c_in, 192, (1, 1), (0, 0))?,
        })
    }
}

impl Module for InceptionC {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let branch1x1 = self.branch1x1.forward(xs)?;
        let branch7x7 = xs.apply(&self.branch7x7_1)?.apply(&self.branch7x7_2)?.apply(&self.branch7x7_3)?;
        let branch7x7dbl = xs
            .apply(&self.branch7x7dbl_1)?
            .apply(&self.branch7x7dbl_2)?
            .apply(&self.branch7x7dbl_3)?
            .apply(&self.branch7x7dbl_4)?
            .apply(&self.branch7x7dbl_5)?;
        let branch_pool = avg_pool_3x3_exclude_pad(xs)?.apply(&self.branch_pool)?;
        Tensor::cat(&[branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)
    }
}

/// torchvision's `InceptionD` (Mixed_7a), unpatched by pytorch-fid.
struct InceptionD {
    branch3x3_1: BasicConv2d,
    branch3x3_2: BasicConv2d,
    branch7x7x3_1: BasicConv2d,
    branch7x7x3_2: BasicConv2d,
    branch7x7x3_3: BasicConv2d,
    branch7x7x3_4: BasicConv2d,
}

impl InceptionD {
    fn new(vb: VarBuilder, c_in: usize, b: ConvBackend) -> Result<Self> {
        let conv = |name: &str, c_in, c_out, kernel, padding, stride| {
            BasicConv2d::new(vb.pp(name), c_in, c_out, kernel, padding, stride, b)
        };
        Ok(Self {
            branch3x3_1: conv("branch3x3_1", c_in, 192, (1, 1), (0, 0), 1)?,
            branch3x3_2: conv("branch3x3_2", 192, 320, (3, 3), (0, 0), 2)?,
            branch7x7x3_1: conv("branch7x7x3_1", c_in, 192, (1, 1), (0, 0), 1)?,
            branch7x7x3_2: conv("branch7x7x3_2", 192, 192, (1, 7), (0, 3), 1)?,
            branch7x7x3_3: conv("branch7x7x3_3", 192, 192, (7, 1), (3, 0), 1)?,
            branch7x7x3_4: conv("branch7x7x3_4", 192, 192, (3, 3), (0, 0), 2)?,
        })
    }
}

impl Module for InceptionD {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let branch3x3 = xs.apply(&self.branch3x3_1)?.apply(&self.branch3x3_2)?;
        let branch7x7x3 = xs
            .apply(&self.branch7x7x3_1)?
            .apply(&self.branch7x7x3_2)?
            .apply(&self.branch7x7x3_3)?
            .apply(&self.branch7x7x3_4)?;
        let branch_pool = max_pool_3x3_s2(xs)?;
        Tensor::cat(&[branch3x3, branch7x7x3, branch_pool], 1)
    }
}

/// `FIDInceptionE_1` (Mixed_7b: average pool without the padding) and `FIDInceptionE_2` (Mixed_7c:
/// max pool, a quirk of the TensorFlow graph that pytorch-fid keeps).
struct InceptionE {
    branch1x1: BasicConv2d,
    branch3x3_1: BasicConv2d,
    branch3x3_2a: BasicConv2d,
    branch3x3_2b: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3a: BasicConv2d,
    branch3x3dbl_3b: BasicConv2d,
    branch_pool: BasicConv2d,
    max_pool: bool,
}

impl InceptionE {
    fn new(vb: VarBuilder, c_in: usize, max_pool: bool, b: ConvBackend) -> Result<Self> {
        let conv = |name: &str, c_in, c_out, kernel, padding| {
            BasicConv2d::new(vb.pp(name), c_in, c_out, kernel, padding, 1, b)
        };
        Ok(Self {
            branch1x1: conv("branch1x1", c_in, 320, (1, 1), (0, 0))?,
            branch3x3_1: conv("branch3x3_1", c_in, 384, (1, 1), (0, 0))?,
            branch3x3_2a: conv("branch3x3_2a", 384, 384, (1, 3), (0, 1))?,
            branch3x3_2b: conv("branch3x3_2b", 384, 384, (3, 1), (1, 0))?,
            branch3x3dbl_1: conv("branch3x3dbl_1", c_in, 448, (1, 1), (0, 0))?,
            branch3x3dbl_2: conv("branch3x3dbl_2", 448, 384, (3, 3), (1, 1))?,
            branch3x3dbl_3a: conv("branch3x3dbl_3a", 384, 384, (1, 3), (0, 1))?,
            branch3x3dbl_3b: conv("branch3x3dbl_3b", 384, 384, (3, 1), (1, 0))?,
            branch_pool: conv("branch_pool", c_in, 192, (1, 1), (0, 0))?,
            max_pool,
        })
    }
}

impl Module for InceptionE {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let branch1x1 = self.branch1x1.forward(xs)?;
        let branch3x3 = self.branch3x3_1.forward(xs)?;
        let branch3x3 =
            Tensor::cat(&[self.branch3x3_2a.forward(&branch3x3)?, self.branch3x3_2b.forward(&branch3x3)?], 1)?;
        let branch3x3dbl = xs.apply(&self.branch3x3dbl_1)?.apply(&self.branch3x3dbl_2)?;
        let branch3x3dbl = Tensor::cat(
            &[self.branch3x3dbl_3a.forward(&branch3x3dbl)?, self.branch3x3dbl_3b.forward(&branch3x3dbl)?],
            1,
        )?;
        let pooled = if self.max_pool { max_pool_3x3_s1_pad1(xs)? } else { avg_pool_3x3_exclude_pad(xs)? };
        let branch_pool = self.branch_pool.forward(&pooled)?;
        Tensor::cat(&[branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)
    }
}

// ---- the network -------------------------------------------------------------------------------

/// pytorch-fid's `InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True)`; the fields
/// are the checkpoint's top-level names.
#[allow(non_snake_case)]
pub struct FidInceptionV3 {
    Conv2d_1a_3x3: BasicConv2d,
    Conv2d_2a_3x3: BasicConv2d,
    Conv2d_2b_3x3: BasicConv2d,
    Conv2d_3b_1x1: BasicConv2d,
    Conv2d_4a_3x3: BasicConv2d,
    Mixed_5b: InceptionA,
    Mixed_5c: InceptionA,
    Mixed_5d: InceptionA,
    Mixed_6a: InceptionB,
    Mixed_6b: InceptionC,
    Mixed_6c: InceptionC,
    Mixed_6d: InceptionC,
    Mixed_6e: InceptionC,
    Mixed_7a: InceptionD,
    Mixed_7b: InceptionE,
    Mixed_7c: InceptionE,
    device: Device,
}

impl FidInceptionV3 {
    /// Builds the network from the checkpoint's tensors (`vb` at the file's root).
    pub fn new(vb: VarBuilder, conv: ConvBackend) -> Result<Self> {
        let b = conv;
        let strided = |name: &str, c_in, c_out| BasicConv2d::new(vb.pp(name), c_in, c_out, (3, 3), (0, 0), 2, b);
        Ok(Self {
            Conv2d_1a_3x3: strided("Conv2d_1a_3x3", 3, 32)?,
            Conv2d_2a_3x3: basic(&vb, "Conv2d_2a_3x3", 32, 32, 3, 0, b)?,
            Conv2d_2b_3x3: basic(&vb, "Conv2d_2b_3x3", 32, 64, 3, 1, b)?,
            Conv2d_3b_1x1: basic(&vb, "Conv2d_3b_1x1", 64, 80, 1, 0, b)?,
            Conv2d_4a_3x3: basic(&vb, "Conv2d_4a_3x3", 80, 192, 3, 0, b)?,
            Mixed_5b: InceptionA::new(vb.pp("Mixed_5b"), 192, 32, b)?,
            Mixed_5c: InceptionA::new(vb.pp("Mixed_5c"), 256, 64, b)?,
            Mixed_5d: InceptionA::new(vb.pp("Mixed_5d"), 288, 64, b)?,
            Mixed_6a: InceptionB::new(vb.pp("Mixed_6a"), 288, b)?,
            Mixed_6b: InceptionC::new(vb.pp("Mixed_6b"), 768, 128, b)?,
            Mixed_6c: InceptionC::new(vb.pp("Mixed_6c"), 768, 160, b)?,
            Mixed_6d: InceptionC::new(vb.pp("Mixed_6d"), 768, 160, b)?,
            Mixed_6e: InceptionC::new(vb.pp("Mixed_6e"), 768, 192, b)?,
            Mixed_7a: InceptionD::new(vb.pp("Mixed_7a"), 768, b)?,
            Mixed_7b: InceptionE::new(vb.pp("Mixed_7b"), 1280, false, b)?,
            Mixed_7c: InceptionE::new(vb.pp("Mixed_7c"), 2048, true, b)?,
            device: vb.device().clone(),
        })
    }

    /// pool3 features (b, 2048) of images `xs` (b, 3, h, w) with values in [0, 1].
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // 1. resize_input: F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        let (b, c, h, w) = xs.dims4()?;
        let n = INPUT_SIZE;
        let resize_h = bilinear_matrix(h, n, &self.device)?.to_dtype(xs.dtype())?; // (299, h)
        let resize_w = bilinear_matrix(w, n, &self.device)?.to_dtype(xs.dtype())?; // (299, w)
        let xs = xs.contiguous()?.reshape((b * c * h, w))?.matmul(&resize_w.t()?)?; // (b·c·h, 299)
        let xs = xs.reshape((b * c, h, n))?.transpose(1, 2)?.contiguous()?.reshape((b * c * n, h))?; // (b·c·299ʷ, h)
        let xs = xs.matmul(&resize_h.t()?)?; // (b·c·299ʷ, 299ʰ)
        let xs = xs.reshape((b * c, n, n))?.transpose(1, 2)?.contiguous()?.reshape((b, c, n, n))?; // (b, c, 299, 299)
                                                                                                   // 2. normalize_input: (0, 1) → (-1, 1)
        let xs = ((xs * 2.0)? - 1.0)?;
        // 3. block 0: input to maxpool1
        let xs = xs.apply(&self.Conv2d_1a_3x3)?.apply(&self.Conv2d_2a_3x3)?.apply(&self.Conv2d_2b_3x3)?;
        let xs = max_pool_3x3_s2(&xs)?;
        // 4. block 1: maxpool1 to maxpool2
        let xs = xs.apply(&self.Conv2d_3b_1x1)?.apply(&self.Conv2d_4a_3x3)?;
        let xs = max_pool_3x3_s2(&xs)?;
        // 5. block 2: Mixed_5b … Mixed_6e
        let xs = xs.apply(&self.Mixed_5b)?.apply(&self.Mixed_5c)?.apply(&self.Mixed_5d)?.apply(&self.Mixed_6a)?;
        let xs = xs.apply(&self.Mixed_6b)?.apply(&self.Mixed_6c)?.apply(&self.Mixed_6d)?.apply(&self.Mixed_6e)?;
        // 6. block 3: Mixed_7a … 7c, then AdaptiveAvgPool2d((1, 1))
        let xs = xs.apply(&self.Mixed_7a)?.apply(&self.Mixed_7b)?.apply(&self.Mixed_7c)?; // (b, 2048, 8, 8)
        xs.mean(D::Minus1)?.mean(D::Minus1) // (b, 2048)
    }
}

/// The (out, in) matrix of PyTorch's 1-D bilinear interpolation with align_corners=False and no
/// antialiasing (aten/src/ATen/native/UpSample.h `area_pixel_compute_source_index`): output i samples
/// source coordinate max((i + 0.5)·in/out − 0.5, 0), between its two neighbours. Resizing as two
/// matrix products is the same weighted sum as ATen's loop, on any device.
pub fn bilinear_matrix(size_in: usize, size_out: usize, device: &Device) -> Result<Tensor> {
    let scale = size_in as f32 / size_out as f32;
    let mut weights = vec![0f32; size_out * size_in];
    for i in 0..size_out {
        let source = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let left = (source as usize).min(size_in - 1);
        let right = if left < size_in - 1 { left + 1 } else { left };
        let lambda1 = source - left as f32;
        let lambda0 = 1.0 - lambda1;
        weights[i * size_in + left] += lambda0;
        weights[i * size_in + right] += lambda1;
    }
    Tensor::from_vec(weights, (size_out, size_in), device)
}
