//! The compiled kernels of `dense.wgsl`, their one bind-group layout, and how a dispatch covers
//! a count of invocations.

use crate::GpuError;

/// Invocations per workgroup of the 1-D kernels (`WG` in the shader).
const WG: u32 = 64;
/// Most workgroups along one dimension of a dispatch (WebGPU's default limit).
const MAX_GROUPS: u32 = 65_535;

/// The uniform block of every kernel (`Params` in the shader), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub n_in: u32,
    pub n_out: u32,
    pub batch: u32,
    pub p_count: u32,
    pub chunk_start: u32,
    pub chunk_len: u32,
    pub w_start: u32,
    pub w_end: u32,
    pub rows_start: u32,
    pub rows_len: u32,
    pub out_start: u32,
    pub out_len: u32,
    pub bias_start: u32,
    pub bias_end: u32,
    pub cols_start: u32,
    pub cols_len: u32,
    pub eps: f32,
    pub scale: f32,
    pub gather_at: u32,
    pub _pad: u32,
}

/// The kernels by entry point.
pub(crate) struct Kernels {
    pub layout: wgpu::BindGroupLayout,
    pub generate: wgpu::ComputePipeline,
    pub norm: wgpu::ComputePipeline,
    pub normalise: wgpu::ComputePipeline,
    pub preactivation: wgpu::ComputePipeline,
    pub products: wgpu::ComputePipeline,
    pub perturbed: wgpu::ComputePipeline,
    pub gather: wgpu::ComputePipeline,
    pub move_clean: wgpu::ComputePipeline,
}

/// An f32 as an exact WGSL hex literal (`0x1.6a09e6p0f`); `x` must be normal and positive.
fn hex_f32(x: f32) -> String {
    let bits = x.to_bits();
    assert!(x.is_normal() && x > 0.0, "{x} is not a positive normal f32");
    let exponent = ((bits >> 23) & 0xFF) as i32 - 127;
    let mantissa = (bits & 0x007F_FFFF) << 1;
    format!("0x1.{mantissa:06x}p{exponent}f")
}

/// The shader: the spec's f32 constants, as the host's code rounds them, then `dense.wgsl`.
pub(crate) fn source() -> String {
    // Each constant as `firmware_protocol::direction` writes it in f32 arithmetic.
    let constants = [
        ("F_SQRT_2", std::f32::consts::SQRT_2),
        ("F_LN_2", std::f32::consts::LN_2),
        ("F_THIRD", 1.0f32 / 3.0),
        ("F_FIFTH", 1.0f32 / 5.0),
        ("F_SEVENTH", 1.0f32 / 7.0),
        ("F_NINTH", 1.0f32 / 9.0),
        ("F_QUARTER_STEP", std::f32::consts::FRAC_PI_2 / 4_194_304.0),
    ];
    let mut s = String::new();
    for (name, value) in constants {
        s.push_str(&format!("const {name}: f32 = {};\n", hex_f32(value)));
    }
    s.push_str(include_str!("dense.wgsl"));
    s
}

impl Kernels {
    pub fn new(device: &wgpu::Device) -> Result<Self, GpuError> {
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("dense.wgsl"),
            source: wgpu::ShaderSource::Wgsl(source().into()),
        });
        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let uniform = wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("dense"),
            entries: &[
                uniform,
                storage(1, true),
                storage(2, true),
                storage(3, false),
                storage(4, false),
                storage(5, false),
                storage(6, false),
                storage(7, false),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("dense"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = |entry: &'static str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let kernels = Self {
            generate: pipeline("generate"),
            norm: pipeline("norm"),
            normalise: pipeline("normalise"),
            preactivation: pipeline("preactivation"),
            products: pipeline("products"),
            perturbed: pipeline("perturbed"),
            gather: pipeline("gather"),
            move_clean: pipeline("move_clean"),
            layout,
        };
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Failed {
                what: "compiling the kernels",
                reason: e.to_string(),
            });
        }
        Ok(kernels)
    }
}

/// Records `pipeline` over `count` invocations of a 64-wide 1-D kernel (as 2-D workgroups where
/// one dimension would exceed the limit).
pub(crate) fn dispatch(
    pass: &mut wgpu::ComputePass<'_>,
    pipeline: &wgpu::ComputePipeline,
    count: usize,
) {
    if count == 0 {
        return;
    }
    let groups = (count as u64).div_ceil(WG as u64);
    let x = groups.min(MAX_GROUPS as u64) as u32;
    let y = groups.div_ceil(x as u64) as u32;
    pass.set_pipeline(pipeline);
    pass.dispatch_workgroups(x, y, 1);
}

/// Records `pipeline` as `groups` workgroups along x (one per direction).
pub(crate) fn dispatch_groups(
    pass: &mut wgpu::ComputePass<'_>,
    pipeline: &wgpu::ComputePipeline,
    groups: u32,
) {
    if groups == 0 {
        return;
    }
    pass.set_pipeline(pipeline);
    pass.dispatch_workgroups(groups, 1, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_literals_are_exact() {
        for x in [std::f32::consts::SQRT_2, 1.0 / 3.0, 1.0, 0.5, 3.75e-7] {
            let s = hex_f32(x);
            let (m, e) = s
                .trim_start_matches("0x1.")
                .trim_end_matches('f')
                .split_once('p')
                .unwrap();
            let m = u32::from_str_radix(m, 16).unwrap() >> 1;
            let e: i32 = e.parse().unwrap();
            let back = f32::from_bits((((e + 127) as u32) << 23) | m);
            assert_eq!(back.to_bits(), x.to_bits(), "{s}");
        }
    }
}
