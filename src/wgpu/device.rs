//! Adapter, device and queue; the pipeline cache; the scratch-buffer pool; and
//! [`Rec`], which records one op's dispatches into a single command encoder
//! and submits them at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::dtype::DType;
use crate::error::{Error, Result};

use super::shaders::{self, ShaderId, StorageVariant};

pub(crate) const BACKEND: &str = "wgpu";

/// Threads per workgroup of every kvsieve pipeline (the `WG` override).
pub(crate) const WORKGROUP: u32 = 256;

/// Largest workgroup count per dispatch dimension (WebGPU's default limit).
const MAX_GROUPS_X: u32 = 65_535;

/// Usage of every kvsieve storage buffer.
pub(crate) const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

pub(crate) fn device_err(reason: impl std::fmt::Display) -> Error {
    Error::Device {
        backend: BACKEND,
        reason: reason.to_string(),
    }
}

/// Bytes of a buffer holding `len` elements of `elem` bytes: padded to whole
/// `u32` words (16-bit buffers of odd length), never zero.
pub(crate) fn padded_bytes(len: usize, elem: usize) -> u64 {
    ((len * elem).div_ceil(4) * 4).max(4) as u64
}

/// `usize` → `u32` for shader addressing.
pub(crate) fn u32c(op: &'static str, x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| {
        crate::error::shape(
            op,
            format!("{x} exceeds the u32 addressing of the wgpu backend"),
        )
    })
}

/// A pipeline: shader, entry point, storage variant and override constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub shader: ShaderId,
    pub entry: &'static str,
    pub variant: StorageVariant,
    pub constants: Vec<(&'static str, u32)>,
}

/// Free scratch buffers, reused across calls (queue order makes reuse after a
/// submission safe: later writes and dispatches run after earlier ones).
#[derive(Default)]
struct Pool {
    free: Vec<wgpu::Buffer>,
}

const POOL_MAX_BUFFERS: usize = 32;

/// The opened device.
pub(crate) struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub native_f16: bool,
    pipelines: RwLock<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    pool: Mutex<Pool>,
}

impl Context {
    pub fn open(allow_f16: bool) -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| Error::NoDevice {
            backend: BACKEND,
            reason: format!("no wgpu adapter: {e} (install a Vulkan, Metal or DX12 driver; on Linux without a GPU, Mesa's lavapipe: apt-get install mesa-vulkan-drivers libvulkan1)"),
        })?;
        let info = adapter.get_info();
        let native_f16 = allow_f16 && adapter.features().contains(wgpu::Features::SHADER_F16);
        let required_features = if native_f16 {
            wgpu::Features::SHADER_F16
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kvsieve"),
            required_features,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| Error::NoDevice {
            backend: BACKEND,
            reason: format!("adapter `{}` refused a device: {e}", info.name),
        })?;
        // Errors inside ops are caught by error scopes; anything else is logged
        // instead of wgpu's default panic.
        device.on_uncaptured_error(Arc::new(|e| {
            eprintln!("kvsieve wgpu: uncaptured device error: {e}");
        }));
        Ok(Self {
            device,
            queue,
            info,
            native_f16,
            pipelines: RwLock::new(HashMap::new()),
            pool: Mutex::new(Pool::default()),
        })
    }

    /// The storage variant used for `dtype` on this device.
    pub fn variant(&self, dtype: DType) -> StorageVariant {
        StorageVariant::for_dtype(dtype, self.native_f16)
    }

    fn pipeline(&self, key: &PipelineKey) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = self
            .pipelines
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return Ok(p.clone());
        }
        let mut map = self
            .pipelines
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = map.get(key) {
            return Ok(p.clone());
        }
        let label = format!("{}_{}", key.entry, key.variant.name());
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let text = shaders::source(key.shader, key.variant);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(text.into()),
            });
        let mut constants: Vec<(&str, f64)> = vec![("WG", f64::from(WORKGROUP))];
        constants.extend(key.constants.iter().map(|&(k, v)| (k, f64::from(v))));
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err(format!("pipeline {label}: {e}")));
        }
        map.insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }

    /// A pooled scratch buffer of at least `bytes` (contents undefined).
    fn lease(&self, bytes: u64) -> wgpu::Buffer {
        let bytes = bytes.max(256).next_power_of_two();
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = pool
            .free
            .iter()
            .position(|b| b.size() >= bytes && b.size() <= 4 * bytes)
        {
            return pool.free.swap_remove(i);
        }
        drop(pool);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kvsieve scratch"),
            size: bytes,
            usage: STORAGE,
            mapped_at_creation: false,
        })
    }

    fn give_back(&self, bufs: Vec<wgpu::Buffer>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        for b in bufs {
            if pool.free.len() >= POOL_MAX_BUFFERS {
                pool.free.remove(0);
            }
            pool.free.push(b);
        }
    }

    /// Waits for all submitted work.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(device_err)
    }

    /// A host-readable buffer of `bytes` (rounded up to whole words).
    fn staging(&self, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kvsieve readback"),
            size: bytes.div_ceil(4).max(1) * 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Copies the first `bytes` bytes of `src` back to the host.
    pub fn read_bytes(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let mut rec = Rec::new(self, "download");
        let staging = rec.readback(src, bytes);
        rec.submit()?;
        self.map_read(&staging, bytes)
    }

    /// Maps a staging buffer filled by [`Rec::readback`] (after the submission)
    /// and returns its first `bytes` bytes.
    pub fn map_read(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            // The receiver lives until after the poll below.
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| device_err("readback: the map callback never ran"))?
            .map_err(|e| device_err(format!("readback: {e}")))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| device_err(format!("readback: {e}")))?;
        let out = view[..bytes as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

/// Records the dispatches of one op into one command encoder; [`Rec::submit`]
/// sends them as one submission. Device errors raised while recording are
/// caught by an error scope and returned as [`Error::Device`].
pub(crate) struct Rec<'a> {
    ctx: &'a Context,
    op: &'static str,
    enc: wgpu::CommandEncoder,
    scope: Option<wgpu::ErrorScopeGuard>,
    leases: Vec<wgpu::Buffer>,
}

impl<'a> Rec<'a> {
    pub fn new(ctx: &'a Context, op: &'static str) -> Self {
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(op) });
        Self {
            ctx,
            op,
            enc,
            scope: Some(scope),
            leases: Vec::new(),
        }
    }

    pub fn ctx(&self) -> &Context {
        self.ctx
    }

    /// A scratch buffer (pooled, contents undefined).
    pub fn scratch(&mut self, bytes: u64) -> wgpu::Buffer {
        let b = self.ctx.lease(bytes);
        self.leases.push(b.clone());
        b
    }

    /// A zero-filled scratch buffer.
    pub fn zeroed(&mut self, bytes: u64) -> wgpu::Buffer {
        let b = self.scratch(bytes);
        self.enc.clear_buffer(&b, 0, None);
        b
    }

    /// A scratch buffer holding `words` (written before this op's commands run).
    pub fn words(&mut self, words: &[u32]) -> wgpu::Buffer {
        let bytes = padded_bytes(words.len(), 4);
        let b = self.scratch(bytes);
        if !words.is_empty() {
            self.ctx
                .queue
                .write_buffer(&b, 0, bytemuck::cast_slice(words));
        }
        b
    }

    /// Records a copy of the first `bytes` of `src` into a new host-readable
    /// buffer (read it with [`Context::map_read`] after [`Rec::submit`]).
    pub fn readback(&mut self, src: &wgpu::Buffer, bytes: u64) -> wgpu::Buffer {
        let staging = self.ctx.staging(bytes);
        self.enc
            .copy_buffer_to_buffer(src, 0, &staging, 0, bytes.div_ceil(4).max(1) * 4);
        staging
    }

    /// Like [`Rec::readback`], from byte `offset` of `src`.
    pub fn readback_range(&mut self, src: &wgpu::Buffer, offset: u64, bytes: u64) -> wgpu::Buffer {
        let staging = self.ctx.staging(bytes);
        if bytes > 0 {
            self.enc
                .copy_buffer_to_buffer(src, offset, &staging, 0, bytes);
        }
        staging
    }

    /// Copies `bytes` (a multiple of 4) from byte `offset` of `src` to the start of `dst`.
    pub fn copy_range(&mut self, src: &wgpu::Buffer, offset: u64, dst: &wgpu::Buffer, bytes: u64) {
        self.enc.copy_buffer_to_buffer(src, offset, dst, 0, bytes);
    }

    /// Copies `bytes` (a multiple of 4) from byte `src_off` of `src` to byte
    /// `dst_off` of `dst`.
    pub fn copy_at(
        &mut self,
        src: &wgpu::Buffer,
        src_off: u64,
        dst: &wgpu::Buffer,
        dst_off: u64,
        bytes: u64,
    ) {
        self.enc
            .copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
    }

    pub fn copy(&mut self, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: u64) {
        self.enc.copy_buffer_to_buffer(src, 0, dst, 0, bytes);
    }

    /// Dispatches `groups` workgroups of `shader` with `bindings` at 0, 1, ...
    pub fn dispatch(
        &mut self,
        shader: ShaderId,
        variant: StorageVariant,
        constants: &[(&'static str, u32)],
        bindings: &[&wgpu::Buffer],
        groups: u32,
    ) -> Result<()> {
        self.dispatch_entry(shader, shader.entry(), variant, constants, bindings, groups)
    }

    /// [`Rec::dispatch`] of a named entry point.
    pub fn dispatch_entry(
        &mut self,
        shader: ShaderId,
        entry: &'static str,
        variant: StorageVariant,
        constants: &[(&'static str, u32)],
        bindings: &[&wgpu::Buffer],
        groups: u32,
    ) -> Result<()> {
        let at: Vec<(u32, &wgpu::Buffer)> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u32, *b))
            .collect();
        self.dispatch_at(shader, entry, variant, constants, &at, groups)
    }

    /// [`Rec::dispatch_entry`] with explicit binding numbers (for entry points
    /// that use a subset of their module's bindings).
    pub fn dispatch_at(
        &mut self,
        shader: ShaderId,
        entry: &'static str,
        variant: StorageVariant,
        constants: &[(&'static str, u32)],
        bindings: &[(u32, &wgpu::Buffer)],
        groups: u32,
    ) -> Result<()> {
        if groups == 0 {
            return Ok(());
        }
        let key = PipelineKey {
            shader,
            entry,
            variant,
            constants: constants.to_vec(),
        };
        let pipeline = self.ctx.pipeline(&key)?;
        let entries: Vec<wgpu::BindGroupEntry<'_>> = bindings
            .iter()
            .map(|&(i, b)| wgpu::BindGroupEntry {
                binding: i,
                resource: b.as_entire_binding(),
            })
            .collect();
        let group = self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
        let (x, y) = if groups <= MAX_GROUPS_X {
            (groups, 1)
        } else {
            (MAX_GROUPS_X, groups.div_ceil(MAX_GROUPS_X))
        };
        let mut pass = self.enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(shader.stem()),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        Ok(())
    }

    /// Submits everything recorded, as one submission.
    pub fn submit(self) -> Result<()> {
        let Rec {
            ctx,
            op,
            enc,
            scope,
            leases,
        } = self;
        ctx.queue.submit([enc.finish()]);
        ctx.give_back(leases);
        if let Some(scope) = scope
            && let Some(e) = pollster::block_on(scope.pop())
        {
            return Err(device_err(format!("{op}: {e}")));
        }
        Ok(())
    }
}

/// Workgroups for `n` invocations of one element each.
pub(crate) fn groups_for(n: usize) -> u32 {
    n.div_ceil(WORKGROUP as usize).min(u32::MAX as usize) as u32
}
