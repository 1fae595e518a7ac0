//! [`GpuDense`]: a fully connected layer with ReLU on the GPU, the same layer as
//! [`pnn_sim::DenseLayer`] (parameters: `W` (n_out x n_in, row-major) then the bias).
//!
//! The host keeps the parameters (an update is applied on the host with
//! `firmware_protocol::direction::apply_update`, so they are the CPU simulator's bits, and the
//! chunk is written to the GPU) and a copy of the clean pre-activation `z0`, refreshed by
//! columns. The GPU keeps the input, the weights and `z0`, and does the products:
//!
//! - `z0 = x Wᵀ + b` once per batch (and after a write), then moved by each update of a chunk
//!   just evaluated: `z0 -= scale sum_p dd_p (x v_pᵀ)`, from the products the evaluation left
//!   on the GPU (the simulator's exact fast path, [`pnn_sim::Choreography::Fast`]);
//! - a perturbed evaluation draws the chunk's P directions on the GPU from their seeds, takes
//!   all P products in one dispatch, and sends back the touched outputs of each `(a+, a-)` and
//!   the columns of `z0` the host's copy lacks: nothing else crosses the bus.

use std::ops::Range;
use std::sync::Arc;

use firmware_protocol::direction::{apply_update, fill_direction};
use firmware_protocol::{DirectionSeed, UpdateTerm};
use pnn_sim::noise::Device;
use pnn_sim::{Choreography, NoiseModel, SimError};

use crate::kernels::{Params, dispatch, dispatch_groups};
use crate::{Gpu, GpuError};

/// A device buffer that grows to what a call needs.
struct Grown {
    label: &'static str,
    buffer: wgpu::Buffer,
    floats: usize,
}

impl Grown {
    fn new(gpu: &Gpu, label: &'static str) -> Result<Self, GpuError> {
        Ok(Self {
            label,
            buffer: gpu.storage(label, 1)?,
            floats: 1,
        })
    }

    /// Makes room for `floats`; `true` where the buffer was replaced (bind groups must follow).
    fn reserve(&mut self, gpu: &Gpu, floats: usize) -> Result<bool, GpuError> {
        if floats <= self.floats {
            return Ok(false);
        }
        let floats = floats.next_power_of_two().max(floats);
        self.buffer = gpu.storage(self.label, floats)?;
        self.floats = floats;
        Ok(true)
    }
}

/// Where a chunk lies in the layer (as [`pnn_sim::DenseLayer`]'s fast path plans it).
#[derive(Clone, Debug)]
struct Plan {
    chunk: Range<usize>,
    /// The chunk's part in `W` (flat) and in the bias (output indices).
    weight_part: Range<usize>,
    bias_part: Range<usize>,
    /// The rows of `W` the chunk covers, and every output the chunk moves.
    rows: Range<usize>,
    outputs: Range<usize>,
}

/// A dense layer on the GPU (see the module docs).
pub struct GpuDense {
    gpu: Arc<Gpu>,
    n_in: usize,
    n_out: usize,
    params: Vec<f32>,
    batch: usize,
    choreography: Choreography,
    uniform: wgpu::Buffer,
    x: Grown,
    w: Grown,
    z0: Grown,
    dirs: Grown,
    dz: Grown,
    out: Grown,
    aux: Grown,
    staging: wgpu::Buffer,
    staging_floats: usize,
    bind_group: Option<wgpu::BindGroup>,
    /// `z0` on the GPU must be recomputed before use.
    stale: bool,
    /// The host's copy of `z0` (batch x n_out), current outside `host_stale`.
    host_z0: Vec<f32>,
    host_stale: Option<Range<usize>>,
    /// The chunk and seeds whose directions and products are on the GPU, while `z0` there is
    /// current for them: an update along the same seeds moves `z0` from them.
    last_fast: Option<(Range<usize>, Vec<DirectionSeed>)>,
    /// What came back from the last evaluation.
    readback: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    /// The hardware effects (`None`: the ideal device), as the CPU simulator keeps them
    /// (`pnn_sim::noise`): the host programs the device's weights at each write and sends the
    /// weights it computes with; the GPU multiplies them.
    device: Option<Box<Device>>,
    /// The weights the device computes with (n_out x n_in) where they differ from the targets;
    /// empty when they are the same. The GPU holds these, not the targets.
    effective: Vec<f32>,
}

impl std::fmt::Debug for GpuDense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GpuDense({}x{} on {})",
            self.n_in,
            self.n_out,
            self.gpu.name()
        )
    }
}

fn u32_of(n: usize, what: &str) -> Result<u32, GpuError> {
    u32::try_from(n).map_err(|_| GpuError::Unsupported(format!("{what} of {n} (over u32)")))
}

impl GpuDense {
    /// A layer with all parameters zero on `gpu`.
    pub fn new(gpu: Arc<Gpu>, n_in: usize, n_out: usize) -> Result<Self, GpuError> {
        let params = vec![0.0; n_out * n_in + n_out];
        u32_of(params.len(), "parameters")?;
        let uniform = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: std::mem::size_of::<Params>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut layer = Self {
            x: Grown::new(&gpu, "input")?,
            w: Grown::new(&gpu, "parameters")?,
            z0: Grown::new(&gpu, "clean pre-activation")?,
            dirs: Grown::new(&gpu, "directions")?,
            dz: Grown::new(&gpu, "direction products")?,
            out: Grown::new(&gpu, "evaluations")?,
            aux: Grown::new(&gpu, "seeds and terms")?,
            staging: gpu.staging(1),
            staging_floats: 1,
            gpu,
            n_in,
            n_out,
            params,
            batch: 0,
            choreography: Choreography::Fast,
            uniform,
            bind_group: None,
            stale: true,
            host_z0: Vec::new(),
            host_stale: None,
            last_fast: None,
            readback: Vec::new(),
            v: Vec::new(),
            g: Vec::new(),
            device: None,
            effective: Vec::new(),
        };
        layer.w.reserve(&layer.gpu, layer.params.len())?;
        layer.upload_params(0..layer.params.len());
        Ok(layer)
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The parameters (the host's copy, which the GPU's equals).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Rows of the cached batch (0 before any).
    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn choreography(&self) -> Choreography {
        self.choreography
    }

    pub fn set_choreography(&mut self, choreography: Choreography) {
        self.choreography = choreography;
        self.last_fast = None;
    }

    /// Writes `range` of the parameters to the GPU: of the weights, those the device computes
    /// with.
    fn upload_params(&mut self, range: Range<usize>) {
        let nw = self.n_out * self.n_in;
        let source = if self.effective.is_empty() {
            &self.params[..nw]
        } else {
            &self.effective[..]
        };
        let weights = range.start.min(nw)..range.end.min(nw);
        let at = |i: usize| (i * 4) as u64;
        let queue = &self.gpu.queue;
        if !weights.is_empty() {
            let bytes: &[u8] = bytemuck::cast_slice(&source[weights.clone()]);
            queue.write_buffer(&self.w.buffer, at(weights.start), bytes);
        }
        let bias = range.start.max(nw)..range.end.max(nw);
        if !bias.is_empty() {
            let bytes: &[u8] = bytemuck::cast_slice(&self.params[bias.clone()]);
            queue.write_buffer(&self.w.buffer, at(bias.start), bytes);
        }
    }

    /// A layer on a device with the hardware effects of `model`, its faults and streams keyed by
    /// `seed`, as [`pnn_sim::DenseLayer::with_noise`] makes it. The effects drawn afresh over
    /// the whole product at every evaluation (`input_noise`, `read_noise`) are refused by name.
    /// Every perturbed evaluation of a device with effects runs the literal choreography.
    pub fn with_noise(
        gpu: Arc<Gpu>,
        n_in: usize,
        n_out: usize,
        model: &NoiseModel,
        seed: u64,
    ) -> Result<Self, GpuError> {
        let mut layer = Self::new(gpu, n_in, n_out)?;
        if model.is_ideal() {
            return Ok(layer);
        }
        let per_evaluation = Self::unsupported_effects(model);
        if !per_evaluation.is_empty() {
            return Err(GpuError::Unsupported(format!(
                "the hardware effect {} (drawn afresh over the whole product at every evaluation)",
                per_evaluation.join(" and ")
            )));
        }
        let device = Device::new(model, n_in * n_out, seed);
        if !device.weights_identity() {
            layer.effective = vec![0.0; n_in * n_out];
        }
        layer.device = Some(Box::new(device));
        layer.write(0..n_in * n_out);
        layer.upload_params(0..layer.params.len());
        Ok(layer)
    }

    /// The effects of `model` the GPU layer does not simulate, by their profile keys: those drawn
    /// afresh over the whole product at every evaluation.
    pub fn unsupported_effects(model: &NoiseModel) -> Vec<&'static str> {
        [
            ("input_noise", model.input_noise != 0.0),
            ("read_noise", model.read_noise != 0.0),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
    }

    /// The device's state, where the layer has hardware effects.
    pub fn device(&self) -> Option<&Device> {
        self.device.as_deref()
    }

    /// A device write of the weights in `range` (as `pnn_sim::DenseLayer` writes): draws their
    /// programming error, restarts their drift clock, refreshes the effective weights that
    /// changed and sends them to the GPU.
    fn write(&mut self, range: Range<usize>) {
        let nw = self.n_out * self.n_in;
        let range = range.start.min(nw)..range.end.min(nw);
        let Some(device) = self.device.as_deref_mut() else {
            return;
        };
        if range.is_empty() {
            return;
        }
        let changed = device.program(&self.params[..nw], range);
        if !self.effective.is_empty() {
            device.effective_range(&self.params, changed.clone(), &mut self.effective);
            self.upload_params(changed);
            self.stale = true;
        }
    }

    /// All effective weights recomputed (the drift clock moved) and sent to the GPU.
    fn refresh_effective(&mut self) {
        let nw = self.n_out * self.n_in;
        if let Some(device) = self.device.as_deref()
            && !self.effective.is_empty()
        {
            device.effective_range(&self.params, 0..nw, &mut self.effective);
            self.upload_params(0..nw);
            self.stale = true;
        }
    }

    pub fn set_params(&mut self, params: &[f32]) -> Result<(), GpuError> {
        if params.len() != self.params.len() {
            return Err(SimError::ParameterCount {
                expected: self.params.len(),
                got: params.len(),
            }
            .into());
        }
        self.params.copy_from_slice(params);
        self.write(0..params.len());
        self.upload_params(0..params.len());
        self.stale = true;
        self.last_fast = None;
        Ok(())
    }

    /// Caches a batch of inputs (batch x n_in, row-major) on the GPU.
    pub fn load_input(&mut self, x: &[f32]) -> Result<(), GpuError> {
        if x.is_empty() || !x.len().is_multiple_of(self.n_in) {
            return Err(SimError::InputShape {
                width: self.n_in,
                got: x.len(),
            }
            .into());
        }
        let batch = x.len() / self.n_in;
        u32_of(batch * self.n_out.max(self.n_in), "batch values")?;
        self.reserve(|l| &mut l.x, x.len())?;
        self.reserve(|l| &mut l.z0, batch * self.n_out)?;
        match self.device.as_deref_mut() {
            Some(device) => {
                let mut converted = x.to_vec();
                device.convert_input(&mut converted);
                let moved = device.tick();
                (self.gpu.queue).write_buffer(&self.x.buffer, 0, bytemuck::cast_slice(&converted));
                if moved {
                    self.refresh_effective();
                }
            }
            None => (self.gpu.queue).write_buffer(&self.x.buffer, 0, bytemuck::cast_slice(x)),
        }
        self.batch = batch;
        self.stale = true;
        self.last_fast = None;
        Ok(())
    }

    fn reserve(
        &mut self,
        which: impl FnOnce(&mut Self) -> &mut Grown,
        floats: usize,
    ) -> Result<(), GpuError> {
        let gpu = Arc::clone(&self.gpu);
        if which(self).reserve(&gpu, floats)? {
            self.bind_group = None;
        }
        Ok(())
    }

    fn reserve_staging(&mut self, floats: usize) {
        if floats > self.staging_floats {
            let floats = floats.next_power_of_two().max(floats);
            self.staging = self.gpu.staging(floats);
            self.staging_floats = floats;
        }
    }

    fn bind_group(&mut self) -> wgpu::BindGroup {
        if let Some(group) = &self.bind_group {
            return group.clone();
        }
        fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
            wgpu::BindGroupEntry {
                binding,
                resource: buffer.as_entire_binding(),
            }
        }
        let group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("dense"),
                layout: &self.gpu.kernels.layout,
                entries: &[
                    entry(0, &self.uniform),
                    entry(1, &self.x.buffer),
                    entry(2, &self.w.buffer),
                    entry(3, &self.z0.buffer),
                    entry(4, &self.dirs.buffer),
                    entry(5, &self.dz.buffer),
                    entry(6, &self.out.buffer),
                    entry(7, &self.aux.buffer),
                ],
            });
        self.bind_group = Some(group.clone());
        group
    }

    fn base_params(&self) -> Params {
        Params {
            n_in: self.n_in as u32,
            n_out: self.n_out as u32,
            batch: self.batch as u32,
            ..Params::default()
        }
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        (self.gpu.device).create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("dense"),
        })
    }

    /// Records `z0 = x Wᵀ + b` where it is stale (the host's copy of it then is, all of it).
    fn record_refresh(&mut self, encoder: &mut wgpu::CommandEncoder) {
        if !self.stale {
            return;
        }
        let group = self.bind_group();
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, &group, &[]);
            dispatch(
                &mut pass,
                &self.gpu.kernels.preactivation,
                self.batch * self.n_out,
            );
        }
        self.stale = false;
        self.host_stale = Some(0..self.n_out);
    }

    /// Brings `z0` on the GPU up to date (submitting the work where there is any).
    fn refresh(&mut self) {
        if self.stale {
            let p = self.base_params();
            (self.gpu.queue).write_buffer(&self.uniform, 0, bytemuck::bytes_of(&p));
            let mut encoder = self.encoder();
            self.record_refresh(&mut encoder);
            self.gpu.queue.submit([encoder.finish()]);
        }
    }

    /// The clean pre-activation `x Wᵀ + b` (batch x n_out), as the host's copy holds it after
    /// bringing it up to date.
    fn clean_preactivation(&mut self) -> Result<&[f32], GpuError> {
        if self.batch == 0 {
            return Err(SimError::NoInput.into());
        }
        self.refresh();
        if self.host_stale.is_some() {
            let len = self.batch * self.n_out;
            self.reserve_staging(len);
            let encoder = self.encoder();
            let mut data = std::mem::take(&mut self.host_z0);
            let result = self.gpu.read_back(
                encoder,
                &self.z0.buffer,
                len,
                &self.staging,
                &mut data,
                "a clean forward pass",
            );
            self.host_z0 = data;
            result?;
            self.host_stale = None;
        }
        Ok(&self.host_z0)
    }

    /// `out = ReLU(x Wᵀ + b)` on the cached input (batch x n_out).
    pub fn forward(&mut self, out: &mut Vec<f32>) -> Result<(), GpuError> {
        self.clean_preactivation()?;
        out.clear();
        match self.device.as_deref().filter(|d| d.has_output_stage()) {
            // The output stage draws its noise afresh at every pass, as the device's does.
            Some(device) => {
                out.extend_from_slice(&self.host_z0);
                device.output_stage(out);
                out.iter_mut().for_each(|a| *a = a.max(0.0));
            }
            None => out.extend(self.host_z0.iter().map(|z| z.max(0.0))),
        }
        Ok(())
    }

    fn check_chunk(&self, chunk: &Range<usize>) -> Result<(), GpuError> {
        if chunk.start >= chunk.end || chunk.end > self.params.len() {
            return Err(SimError::ChunkOutOfRange {
                start: chunk.start,
                end: chunk.end,
                count: self.params.len(),
            }
            .into());
        }
        Ok(())
    }

    fn plan(&self, chunk: &Range<usize>) -> Plan {
        let (n_in, n_out) = (self.n_in, self.n_out);
        let nw = n_out * n_in;
        let weight_part = chunk.start.min(nw)..chunk.end.min(nw);
        let bias_part = chunk.start.max(nw) - nw..chunk.end.max(nw) - nw;
        let rows = if weight_part.is_empty() {
            0..0
        } else {
            weight_part.start / n_in..weight_part.end.div_ceil(n_in)
        };
        let (mut lo, mut hi) = (n_out, 0);
        if !rows.is_empty() {
            (lo, hi) = (rows.start, rows.end);
        }
        if !bias_part.is_empty() {
            (lo, hi) = (lo.min(bias_part.start), hi.max(bias_part.end));
        }
        Plan {
            chunk: chunk.clone(),
            weight_part,
            bias_part,
            rows,
            outputs: lo..hi,
        }
    }

    fn plan_params(&self, plan: &Plan, p_count: usize, eps: f32) -> Params {
        Params {
            p_count: p_count as u32,
            chunk_start: plan.chunk.start as u32,
            chunk_len: plan.chunk.len() as u32,
            w_start: plan.weight_part.start as u32,
            w_end: plan.weight_part.end as u32,
            rows_start: plan.rows.start as u32,
            rows_len: plan.rows.len() as u32,
            out_start: plan.outputs.start as u32,
            out_len: plan.outputs.len() as u32,
            bias_start: plan.bias_part.start as u32,
            bias_end: plan.bias_part.end as u32,
            eps,
            ..self.base_params()
        }
    }

    /// Writes the seeds (and room for the terms, norms and flags: 5 words per direction).
    fn upload_seeds(&mut self, seeds: &[DirectionSeed]) -> Result<(), GpuError> {
        self.reserve(|l| &mut l.aux, 5 * seeds.len())?;
        let words: Vec<u32> = (seeds.iter())
            .flat_map(|s| [s.0 as u32, (s.0 >> 32) as u32])
            .collect();
        (self.gpu.queue).write_buffer(&self.aux.buffer, 0, bytemuck::cast_slice(&words));
        Ok(())
    }

    fn record_directions(&self, pass: &mut wgpu::ComputePass<'_>, p_count: usize, len: usize) {
        let k = &self.gpu.kernels;
        dispatch(pass, &k.generate, p_count * len.div_ceil(2));
        dispatch_groups(pass, &k.norm, p_count as u32);
        dispatch(pass, &k.normalise, p_count * len);
    }

    /// The normalised directions of `seeds` over a chunk of `len`, drawn on the GPU (P x len):
    /// the host's `fill_direction` bits where the driver rounds as IEEE does (lavapipe).
    pub fn draw_directions(
        &mut self,
        seeds: &[DirectionSeed],
        len: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let p_count = seeds.len();
        u32_of(p_count * len, "direction values")?;
        self.upload_seeds(seeds)?;
        self.reserve(|l| &mut l.dirs, p_count * len)?;
        self.reserve_staging(p_count * len);
        let p = Params {
            p_count: p_count as u32,
            chunk_len: len as u32,
            ..self.base_params()
        };
        (self.gpu.queue).write_buffer(&self.uniform, 0, bytemuck::bytes_of(&p));
        let group = self.bind_group();
        let mut encoder = self.encoder();
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, &group, &[]);
            self.record_directions(&mut pass, p_count, len);
        }
        let mut out = Vec::new();
        self.gpu.read_back(
            encoder,
            &self.dirs.buffer,
            p_count * len,
            &self.staging,
            &mut out,
            "drawing directions",
        )?;
        self.last_fast = None;
        Ok(out)
    }

    /// Algorithm 1, lines 6-9, for each seed: `(a+, a-)`, the activations under `W ± eps v`
    /// over `chunk`. Leaves the parameters bit-identical.
    pub fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), GpuError> {
        self.check_chunk(&chunk)?;
        if self.batch == 0 {
            return Err(SimError::NoInput.into());
        }
        out.resize_with(seeds.len(), Default::default);
        if self.choreography == Choreography::Reference || self.device.is_some() {
            return self.perturbed_reference(chunk, seeds, eps, out);
        }
        let outputs = self.perturbed_fast(&chunk, seeds, eps)?;
        let (batch, n_out, t) = (self.batch, self.n_out, outputs.len());
        let touched = &self.readback;
        for (p, (plus, minus)) in out.iter_mut().enumerate() {
            for (s, target) in [(0, &mut *plus), (1, &mut *minus)] {
                target.clear();
                target.extend(self.host_z0.iter().map(|z| z.max(0.0)));
                let block = &touched[(2 * p + s) * batch * t..][..batch * t];
                for (row, cols) in target.chunks_exact_mut(n_out).zip(block.chunks_exact(t)) {
                    row[outputs.clone()].copy_from_slice(cols);
                }
            }
        }
        Ok(())
    }

    /// [`GpuDense::evaluate_perturbed`] over the outputs the chunk touches only (each pair
    /// batch x touched outputs), with the clean activations in `clean` (batch x n_out): the
    /// same values, bit for bit. `false`, computing nothing, on the reference choreography.
    pub fn evaluate_perturbed_columns(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
        clean: &mut Vec<f32>,
    ) -> Result<bool, GpuError> {
        self.check_chunk(&chunk)?;
        if self.batch == 0 {
            return Err(SimError::NoInput.into());
        }
        if self.choreography != Choreography::Fast || self.device.is_some() {
            return Ok(false);
        }
        out.resize_with(seeds.len(), Default::default);
        let outputs = self.perturbed_fast(&chunk, seeds, eps)?;
        let block = self.batch * outputs.len();
        for (p, (plus, minus)) in out.iter_mut().enumerate() {
            for (s, target) in [(0, &mut *plus), (1, &mut *minus)] {
                target.clear();
                target.extend_from_slice(&self.readback[(2 * p + s) * block..][..block]);
            }
        }
        clean.clear();
        clean.extend(self.host_z0.iter().map(|z| z.max(0.0)));
        Ok(true)
    }

    /// The fast path: one submission draws the directions, takes their products, writes the
    /// touched outputs of every evaluation and the stale columns of `z0`, and one read brings
    /// them back (into `readback`, the pairs first; `host_z0` is then current). Returns the
    /// touched outputs.
    fn perturbed_fast(
        &mut self,
        chunk: &Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
    ) -> Result<Range<usize>, GpuError> {
        let plan = self.plan(chunk);
        let (p_count, batch, len) = (seeds.len(), self.batch, chunk.len());
        let t = plan.outputs.len();
        let pairs_len = 2 * p_count * batch * t;
        let mut p = self.plan_params(&plan, p_count, eps);
        // The columns of z0 to send: those the host's copy lacks (all after a refresh).
        let cols = if self.stale {
            0..self.n_out
        } else {
            self.host_stale.clone().unwrap_or(0..0)
        };
        (p.cols_start, p.cols_len, p.gather_at) =
            (cols.start as u32, cols.len() as u32, pairs_len as u32);
        let total = pairs_len + batch * cols.len();
        u32_of(
            total
                .max(p_count * len)
                .max(batch * p_count * plan.rows.len()),
            "values",
        )?;
        self.upload_seeds(seeds)?;
        self.reserve(|l| &mut l.dirs, p_count * len)?;
        self.reserve(|l| &mut l.dz, batch * p_count * plan.rows.len())?;
        self.reserve(|l| &mut l.out, total)?;
        self.reserve_staging(total);
        let mut encoder = self.encoder();
        if self.stale {
            let base = self.base_params();
            (self.gpu.queue).write_buffer(&self.uniform, 0, bytemuck::bytes_of(&base));
            self.record_refresh(&mut encoder);
            // The refresh's uniform must reach the GPU before the evaluation's replaces it.
            self.gpu.queue.submit([encoder.finish()]);
            encoder = self.encoder();
        }
        (self.gpu.queue).write_buffer(&self.uniform, 0, bytemuck::bytes_of(&p));
        let group = self.bind_group();
        {
            let gpu = Arc::clone(&self.gpu);
            let k = &gpu.kernels;
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, &group, &[]);
            self.record_directions(&mut pass, p_count, len);
            dispatch(&mut pass, &k.products, batch * p_count * plan.rows.len());
            dispatch(&mut pass, &k.perturbed, pairs_len);
            dispatch(&mut pass, &k.gather, batch * cols.len());
        }
        let mut data = std::mem::take(&mut self.readback);
        let result = self.gpu.read_back(
            encoder,
            &self.out.buffer,
            total,
            &self.staging,
            &mut data,
            "a perturbed evaluation",
        );
        self.readback = data;
        result?;
        if !cols.is_empty() {
            let n_out = self.n_out;
            self.host_z0.resize(batch * n_out, 0.0);
            let gathered = &self.readback[pairs_len..];
            for (row, got) in
                (self.host_z0.chunks_exact_mut(n_out)).zip(gathered.chunks_exact(cols.len()))
            {
                row[cols.clone()].copy_from_slice(got);
            }
        }
        self.host_stale = None;
        self.last_fast = Some((chunk.clone(), seeds.to_vec()));
        Ok(plan.outputs)
    }

    /// The literal choreography: per seed and sign, the chunk written as `w0 ± eps v`, a full
    /// forward, and the chunk restored (the reference the fast path is held to).
    fn perturbed_reference(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
    ) -> Result<(), GpuError> {
        let saved = self.params[chunk.clone()].to_vec();
        let nw = self.n_out * self.n_in;
        let weight_part = chunk.start.min(nw)..chunk.end.min(nw);
        let saved_effective = match self.effective.is_empty() {
            true => Vec::new(),
            false => self.effective[weight_part.clone()].to_vec(),
        };
        let mut v = vec![0f32; chunk.len()];
        let mut result = Ok(());
        'seeds: for (seed, (plus, minus)) in seeds.iter().zip(out.iter_mut()) {
            fill_direction(*seed, &mut v);
            for (sign, target) in [(1.0f32, &mut *plus), (-1.0, &mut *minus)] {
                for ((w, w0), vi) in self.params[chunk.clone()].iter_mut().zip(&saved).zip(&v) {
                    *w = w0 + sign * eps * vi;
                }
                // The perturbed targets' effective weights (not a write: the programming error
                // and the drift clock stay).
                if let Some(device) = self.device.as_deref()
                    && !self.effective.is_empty()
                {
                    device.effective_range(&self.params, weight_part.clone(), &mut self.effective);
                }
                self.upload_params(chunk.clone());
                self.stale = true;
                if let Err(e) = self.forward(target) {
                    result = Err(e);
                    break 'seeds;
                }
            }
        }
        self.params[chunk.clone()].copy_from_slice(&saved);
        if !self.effective.is_empty() {
            self.effective[weight_part].copy_from_slice(&saved_effective);
        }
        self.upload_params(chunk);
        self.stale = true;
        self.last_fast = None;
        result
    }

    /// Algorithm 1, lines 10 and 12, on the chunk: the host applies
    /// `firmware_protocol::direction::apply_update` to its parameters and writes the chunk to
    /// the GPU; where the update follows the evaluation of the same chunk and seeds, `z0` is
    /// moved by the products already there instead of recomputed.
    pub fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), GpuError> {
        self.check_chunk(&chunk)?;
        let n = chunk.len();
        self.v.resize(n, 0.0);
        self.g.resize(n, 0.0);
        apply_update(
            &mut self.params[chunk.clone()],
            scale,
            terms,
            &mut self.v,
            &mut self.g,
        );
        // An update is a write of the chunk: stuck devices ignore it, the others are programmed
        // anew (their effective weights sent by `write`).
        self.write(chunk.clone());
        self.upload_params(chunk.clone());
        let follows_evaluation = self.last_fast.as_ref().is_some_and(|(c, seeds)| {
            *c == chunk
                && seeds.len() == terms.len()
                && seeds.iter().zip(terms).all(|(s, t)| *s == t.seed)
        });
        self.last_fast = None;
        if !(follows_evaluation && self.choreography == Choreography::Fast && !self.stale) {
            self.stale = true;
            return Ok(());
        }
        let plan = self.plan(&chunk);
        let p_count = terms.len();
        let mut p = self.plan_params(&plan, p_count, 0.0);
        p.scale = scale;
        let derivatives: Vec<f32> = terms.iter().map(|t| t.derivative).collect();
        (self.gpu.queue).write_buffer(
            &self.aux.buffer,
            (2 * p_count * 4) as u64,
            bytemuck::cast_slice(&derivatives),
        );
        (self.gpu.queue).write_buffer(&self.uniform, 0, bytemuck::bytes_of(&p));
        let group = self.bind_group();
        let mut encoder = self.encoder();
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, &group, &[]);
            dispatch(
                &mut pass,
                &self.gpu.kernels.move_clean,
                self.batch * plan.outputs.len(),
            );
        }
        self.gpu.queue.submit([encoder.finish()]);
        let outputs = plan.outputs;
        self.host_stale = Some(match self.host_stale.take() {
            Some(s) => s.start.min(outputs.start)..s.end.max(outputs.end),
            None => outputs,
        });
        Ok(())
    }
}
