//! Simulated physical layers on a GPU: wgpu compute shaders in WGSL, the same layers as `pnn-sim`
//! ([`pnn_sim::DenseLayer`]) with the same exact fast paths (the clean pre-activation once per
//! batch, moved by updates; all P directions of a chunk in one product; directions drawn on the
//! GPU from their seeds by a WGSL port of `firmware_protocol::direction`).
//!
//! A missing adapter is a runtime condition ([`GpuError::NoAdapter`], saying what was looked for
//! and how to get it), never a build one: this crate builds on a machine without any GPU, and on
//! Mesa's software Vulkan driver (lavapipe) its kernels run, slowly, with the host's bits.
//!
//! Every wait for the device is bounded ([`Gpu::timeout`]): a hung driver becomes
//! [`GpuError::Timeout`], not a stuck process.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

pub mod dense;
mod kernels;

pub use dense::GpuDense;

/// What the GPU backend refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no usable GPU adapter{wanted}: found {found}. The GPU backend needs a Vulkan driver: on a \
         machine with a GPU install its vendor's driver (NVIDIA: the proprietary driver with its \
         Vulkan ICD; check with `vulkaninfo --summary`); without one, Mesa's software driver runs \
         the kernels slowly on the CPU (`apt-get install -y mesa-vulkan-drivers libvulkan1`)"
    )]
    NoAdapter { wanted: String, found: String },
    #[error(
        "the GPU adapter '{adapter}' lacks {feature}, which the direction spec's f64 norm needs"
    )]
    MissingFeature {
        adapter: String,
        feature: &'static str,
    },
    #[error("the GPU device could not be opened on '{adapter}': {reason}")]
    Device { adapter: String, reason: String },
    #[error(
        "the GPU did not finish {what} within {seconds} s (raise PNN_GPU_TIMEOUT_S if the device is just slow)"
    )]
    Timeout { what: &'static str, seconds: u64 },
    #[error("the GPU failed {what}: {reason}")]
    Failed { what: &'static str, reason: String },
    #[error("{0}")]
    Layer(#[from] pnn_sim::SimError),
    #[error("{0} is not supported by the GPU backend")]
    Unsupported(String),
}

/// One opened GPU: device, queue and the compiled kernels, shared by every layer on it.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    kernels: kernels::Kernels,
    timeout: Duration,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.name())
    }
}

/// The Vulkan adapters this machine offers (their names), possibly none.
pub fn adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = instance();
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN))
        .iter()
        .map(|a| a.get_info())
        .collect()
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN;
    wgpu::Instance::new(desc)
}

/// How long one wait for the device may take: `PNN_GPU_TIMEOUT_S` seconds, 120 by default.
fn timeout_from_env() -> Duration {
    let seconds = std::env::var("PNN_GPU_TIMEOUT_S")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(120);
    Duration::from_secs(seconds)
}

impl Gpu {
    /// Opens the first adapter whose name contains `name` (case-insensitive), or, with `None`,
    /// the first discrete GPU, else any GPU, else a software one (lavapipe).
    pub fn open(name: Option<&str>) -> Result<Arc<Gpu>, GpuError> {
        let instance = instance();
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
        let found = if adapters.is_empty() {
            "none".to_string()
        } else {
            (adapters.iter())
                .map(|a| format!("'{}'", a.get_info().name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu | wgpu::DeviceType::Other => 2,
            wgpu::DeviceType::Cpu => 3,
        };
        let mut candidates: Vec<wgpu::Adapter> = match name {
            Some(n) => {
                let n = n.to_lowercase();
                (adapters.into_iter())
                    .filter(|a| a.get_info().name.to_lowercase().contains(&n))
                    .collect()
            }
            None => adapters,
        };
        candidates.sort_by_key(rank);
        let Some(adapter) = candidates.into_iter().next() else {
            return Err(GpuError::NoAdapter {
                wanted: name
                    .map(|n| format!(" whose name contains '{n}'"))
                    .unwrap_or_default(),
                found,
            });
        };
        Self::on(adapter)
    }

    fn on(adapter: wgpu::Adapter) -> Result<Arc<Gpu>, GpuError> {
        let info = adapter.get_info();
        if !adapter.features().contains(wgpu::Features::SHADER_F64) {
            return Err(GpuError::MissingFeature {
                adapter: info.name.clone(),
                feature: "64-bit floats in shaders (SHADER_F64)",
            });
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("pnn-gpu"),
            required_features: wgpu::Features::SHADER_F64,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::Device {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
        let kernels = kernels::Kernels::new(&device)?;
        Ok(Arc::new(Gpu {
            device,
            queue,
            info,
            limits,
            kernels,
            timeout: timeout_from_env(),
        }))
    }

    /// The adapter's name (`llvmpipe (LLVM ...)` for lavapipe).
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Whether this is a software rasteriser on the CPU (lavapipe), where every f32 operation
    /// rounds as IEEE does and the directions are the host's bits.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The bound on every wait for the device.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Waits (bounded) until the device has finished everything submitted.
    fn wait(&self, what: &'static str) -> Result<(), GpuError> {
        match self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(self.timeout),
        }) {
            Ok(_) => Ok(()),
            Err(wgpu::PollError::Timeout) => Err(GpuError::Timeout {
                what,
                seconds: self.timeout.as_secs(),
            }),
            Err(e) => Err(GpuError::Failed {
                what,
                reason: e.to_string(),
            }),
        }
    }

    /// Copies the first `len` f32 of `src` back to the host, waiting at most
    /// [`Gpu::timeout`]; `encoder` holds the work that produces them and is submitted here.
    fn read_back(
        &self,
        mut encoder: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        len: usize,
        staging: &wgpu::Buffer,
        out: &mut Vec<f32>,
        what: &'static str,
    ) -> Result<(), GpuError> {
        out.clear();
        if len == 0 {
            self.queue.submit([encoder.finish()]);
            return Ok(());
        }
        let bytes = (len * 4) as u64;
        encoder.copy_buffer_to_buffer(src, 0, staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.wait(what)?;
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(GpuError::Failed {
                    what,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(GpuError::Timeout {
                    what,
                    seconds: self.timeout.as_secs(),
                });
            }
        }
        {
            let view = staging
                .get_mapped_range(0..bytes)
                .map_err(|e| GpuError::Failed {
                    what,
                    reason: e.to_string(),
                })?;
            out.extend_from_slice(bytemuck::cast_slice(&view));
        }
        staging.unmap();
        Ok(())
    }

    fn storage(&self, label: &'static str, floats: usize) -> Result<wgpu::Buffer, GpuError> {
        let size = (floats.max(1) * 4) as u64;
        if size > self.limits.max_storage_buffer_binding_size || size > self.limits.max_buffer_size
        {
            return Err(GpuError::Unsupported(format!(
                "a buffer of {floats} floats ({label}) on '{}', whose largest is {} bytes",
                self.name(),
                self.limits.max_storage_buffer_binding_size
            )));
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }))
    }

    fn staging(&self, floats: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size: (floats.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }
}

/// The GPU for tests and benchmarks: opened once per process (`PNN_GPU_ADAPTER`, a name
/// substring, picks one), or `None` after printing why it is skipped where there is none.
/// With `PNN_REQUIRE_GPU=1` a missing GPU panics instead, so that a machine meant to test the
/// GPU cannot pass by skipping.
pub fn available(what: &str) -> Option<Arc<Gpu>> {
    static GPU: std::sync::OnceLock<Result<Arc<Gpu>, String>> = std::sync::OnceLock::new();
    let opened = GPU.get_or_init(|| {
        let name = std::env::var("PNN_GPU_ADAPTER").ok();
        let gpu = Gpu::open(name.as_deref()).map_err(|e| e.to_string());
        if let Ok(gpu) = &gpu {
            eprintln!("GPU tests run on '{}'", gpu.name());
        }
        gpu
    });
    match opened {
        Ok(gpu) => Some(Arc::clone(gpu)),
        Err(why) if std::env::var("PNN_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("{what}: PNN_REQUIRE_GPU=1 but no GPU could be opened: {why}")
        }
        Err(why) => {
            firmware_protocol::skipped::skipped(
                what,
                &format!("{why} (set PNN_REQUIRE_GPU=1 to make this a failure)"),
            );
            None
        }
    }
}
