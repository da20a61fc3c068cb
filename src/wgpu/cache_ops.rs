//! `gather_rows`, `scatter_rows`, `compact_rows`, `merge_rows`: one
//! invocation per element (per `u32` word for `scatter_rows` and
//! `compact_rows` on rows of whole words, which they write in place).

use crate::backend::{CacheOps, CompactMeta, GatherMeta, MergeMeta, ScatterMeta};
use crate::dtype::{DType, Element};
use crate::error::Result;

use super::device::{Rec, groups_for, padded_bytes, u32c};
use super::shaders::{ShaderId, StorageVariant};
use super::{Wgpu, WgpuBuffer, f32_bits, out_target, pack_into};

/// Runs `shader` (compact or scatter) into a widened copy of `buf` (16-bit
/// rows of odd width, which share words with their neighbours) — so rows
/// it does not write keep their values and in-place moves cannot race — then
/// copies (f32) or packs (16-bit) the copy back. `src` defaults to `buf`.
fn update_rows<T: Element>(
    b: &Wgpu,
    op: &'static str,
    shader: ShaderId,
    words: &[u32],
    elems: usize,
    src: Option<&WgpuBuffer<T>>,
    buf: &mut WgpuBuffer<T>,
) -> Result<()> {
    let variant = b.ctx.variant(T::DTYPE);
    let mut rec = Rec::new(&b.ctx, op);
    let m = rec.words(words);
    let bytes = padded_bytes(buf.len, 4);
    let wide = rec.scratch(bytes);
    if T::DTYPE == DType::F32 {
        rec.copy(&buf.raw, &wide, bytes);
    } else {
        let n = rec.words(&[u32c(op, buf.len)?]);
        rec.dispatch(
            ShaderId::Widen,
            variant,
            &[],
            &[&n, &buf.raw, &wide],
            groups_for(buf.len),
        )?;
    }
    let src = src.map_or(&buf.raw, |s| &s.raw);
    rec.dispatch(shader, variant, &[], &[&m, src, &wide], groups_for(elems))?;
    if T::DTYPE == DType::F32 {
        rec.copy(&wide, &buf.raw, bytes);
    } else {
        pack_into(&mut rec, &wide, buf)?;
    }
    rec.submit()
}

/// Words per row when rows of `width` elements are whole `u32` words (f32,
/// or 16-bit with an even width): such rows can be moved word by word in
/// place, with no neighbour sharing a word.
fn whole_words<T: Element>(width: usize) -> Option<usize> {
    let bytes = width * std::mem::size_of::<T>();
    bytes.is_multiple_of(4).then_some(bytes / 4)
}

/// Runs the word-copy `entry` of `shader` (`n` invocations) over the raw
/// words of `bindings` (dtype-independent: the F32 module).
fn move_words(
    b: &Wgpu,
    op: &'static str,
    shader: ShaderId,
    entry: &'static str,
    words: &[u32],
    n: usize,
    bindings: &[(u32, &wgpu::Buffer)],
) -> Result<()> {
    let mut rec = Rec::new(&b.ctx, op);
    let m = rec.words(words);
    let mut at = vec![(0, &m)];
    at.extend_from_slice(bindings);
    rec.dispatch_at(shader, entry, StorageVariant::F32, &[], &at, groups_for(n))?;
    rec.submit()
}

/// Runs `shader` (gather or merge) from `src` into every element of `dst`
/// (`elems` invocations): written straight to an f32 `dst`, through an f32
/// scratch and `pack` for 16-bit storage.
fn write_rows<T: Element>(
    b: &Wgpu,
    op: &'static str,
    shader: ShaderId,
    words: &[u32],
    elems: usize,
    src: &WgpuBuffer<T>,
    dst: &mut WgpuBuffer<T>,
) -> Result<()> {
    let mut rec = Rec::new(&b.ctx, op);
    let m = rec.words(words);
    let target = out_target(&mut rec, dst);
    let variant = b.ctx.variant(T::DTYPE);
    rec.dispatch(
        shader,
        variant,
        &[],
        &[&m, &src.raw, &target],
        groups_for(elems),
    )?;
    pack_into(&mut rec, &target, dst)?;
    rec.submit()
}

impl CacheOps for Wgpu {
    /// Rows of whole `u32` words are written in place, one invocation per
    /// word (destinations are unique): the cost is the written rows, not
    /// the buffer. 16-bit rows of odd width go through a widened copy.
    fn scatter_rows<T: Element>(
        &self,
        meta: &ScatterMeta,
        src: &WgpuBuffer<T>,
        dst: &mut WgpuBuffer<T>,
    ) -> Result<()> {
        const OP: &str = "scatter_rows";
        let elems = meta.indices().len() * meta.width();
        if elems == 0 {
            return Ok(());
        }
        if let Some(wpr) = whole_words::<T>(meta.width()) {
            let n = meta.indices().len() * wpr;
            let mut words = vec![u32c(OP, n)?, u32c(OP, wpr)?];
            words.extend_from_slice(meta.indices());
            return move_words(
                self,
                OP,
                ShaderId::ScatterRows,
                "scatter_rows_words",
                &words,
                n,
                &[(3, &src.raw), (4, &dst.raw)],
            );
        }
        let mut words = vec![u32c(OP, elems)?, u32c(OP, meta.width())?];
        words.extend_from_slice(meta.indices());
        update_rows(
            self,
            OP,
            ShaderId::ScatterRows,
            &words,
            elems,
            Some(src),
            dst,
        )
    }

    fn gather_rows<T: Element>(
        &self,
        meta: &GatherMeta,
        src: &WgpuBuffer<T>,
        dst: &mut WgpuBuffer<T>,
    ) -> Result<()> {
        const OP: &str = "gather_rows";
        let elems = meta.indices().len() * meta.width();
        if elems == 0 {
            return Ok(());
        }
        let mut words = vec![u32c(OP, elems)?, u32c(OP, meta.width())?];
        words.extend_from_slice(meta.indices());
        write_rows(self, OP, ShaderId::GatherRows, &words, elems, src, dst)
    }

    /// Rows of whole `u32` words (f32, or 16-bit with an even width) move in
    /// place, one invocation per word: sources and destinations of a
    /// compaction are disjoint rows, so no invocation reads a word another
    /// writes, and the cost is the moved rows, not the buffer. 16-bit rows of
    /// odd width share a word with their neighbour and go through a widened
    /// copy of the whole buffer instead.
    fn compact_rows<T: Element>(&self, meta: &CompactMeta, buf: &mut WgpuBuffer<T>) -> Result<()> {
        const OP: &str = "compact_rows";
        let w = meta.width();
        let mut pairs = Vec::with_capacity(2 * meta.moves().len());
        for &(dst, src) in meta.moves() {
            pairs.push(dst);
            pairs.push(src);
        }
        if pairs.is_empty() {
            return Ok(());
        }
        if let Some(wpr) = whole_words::<T>(w) {
            let n = pairs.len() / 2 * wpr;
            let mut words = vec![u32c(OP, n)?, u32c(OP, wpr)?];
            words.extend(pairs);
            return move_words(
                self,
                OP,
                ShaderId::CompactRows,
                "compact_rows_words",
                &words,
                n,
                &[(3, &buf.raw)],
            );
        }
        let elems = pairs.len() / 2 * w;
        let mut words = vec![u32c(OP, elems)?, u32c(OP, w)?];
        words.extend(pairs);
        update_rows(self, OP, ShaderId::CompactRows, &words, elems, None, buf)
    }

    fn merge_rows<T: Element>(
        &self,
        meta: &MergeMeta,
        src: &WgpuBuffer<T>,
        dst: &mut WgpuBuffer<T>,
    ) -> Result<()> {
        const OP: &str = "merge_rows";
        let groups = meta.groups();
        let elems = groups.num_segments() * meta.width();
        if elems == 0 {
            return Ok(());
        }
        let mut words = vec![
            u32c(OP, elems)?,
            u32c(OP, meta.width())?,
            u32c(OP, groups.num_segments())?,
        ];
        words.extend_from_slice(groups.indptr());
        words.extend_from_slice(meta.members());
        words.extend(f32_bits(meta.weights()));
        write_rows(self, OP, ShaderId::MergeRows, &words, elems, src, dst)
    }
}
