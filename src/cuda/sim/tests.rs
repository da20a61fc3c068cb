//! The simulator against known answers (`sim_ok_*`) and each detector against a kernel with
//! one deliberate defect (`sim_bad_*` in `cuda/sim/selftest.cu`).

use super::*;

fn sim_bytes(bytes: &[u8]) -> DeviceBytes {
    let mut b = SimBuf::zeroed(bytes.len());
    b.bytes_mut().copy_from_slice(bytes);
    DeviceBytes::Sim(b)
}

fn bytes_of(d: &DeviceBytes) -> &[u8] {
    match d {
        DeviceBytes::Sim(b) => b.bytes(),
        DeviceBytes::Driver(_) => unreachable!("simulator buffers only"),
    }
}

/// Runs `name(x, out, n)` with `x = 0, 1, 2, ...` (`x_len` floats) and `out` of `out_len`.
fn run_xon(
    name: &str,
    grid: u32,
    block: u32,
    x_len: usize,
    out_len: usize,
    n: u32,
) -> Result<Vec<f32>> {
    let x: Vec<f32> = (0..x_len).map(|i| i as f32).collect();
    let xb = sim_bytes(bytemuck::cast_slice(&x));
    let mut out = sim_bytes(&vec![0u8; out_len * 4]);
    launch(
        name,
        (grid, 1, 1),
        (block, 1, 1),
        &mut [Arg::In(&xb), Arg::Out(&mut out), Arg::U32(n)],
    )?;
    Ok(bytemuck::pod_collect_to_vec(bytes_of(&out)))
}

/// The launch must fail with a message that names the kernel and contains every `want`.
fn expect_failure(r: Result<Vec<f32>>, name: &str, want: &[&str]) {
    let msg = match r {
        Ok(_) => panic!("{name}: the launch succeeded; its detector did not fire"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(&format!("`{name}`")), "{name}: {msg}");
    for w in want {
        assert!(msg.contains(w), "{name}: expected `{w}` in: {msg}");
    }
}

#[test]
fn every_registered_kernel_is_in_the_simulator_build() {
    let names = kernel_names();
    for id in crate::cuda::KernelId::ALL {
        for e in id.entries() {
            assert!(
                names.iter().any(|n| n == e),
                "{e} of {}.cu is missing",
                id.stem()
            );
        }
    }
    assert!(names.iter().any(|n| n == "sim_ok_reduce"));
}

#[test]
fn reductions_ballots_shuffles_and_atomics_give_known_answers() {
    for block in [32u32, 64, 256] {
        let blocks = 3u32;
        let n = (blocks * block) as usize;
        let inp: Vec<u32> = (0..n as u32).map(|i| i * 7 % 13).collect();
        let ib = sim_bytes(bytemuck::cast_slice(&inp));
        let mut out = sim_bytes(&vec![0u8; 16 * blocks as usize]);
        launch(
            "sim_ok_reduce",
            (blocks, 1, 1),
            (block, 1, 1),
            &mut [Arg::In(&ib), Arg::Out(&mut out)],
        )
        .unwrap();
        let got: Vec<u32> = bytemuck::pod_collect_to_vec(bytes_of(&out));
        for b in 0..blocks as usize {
            let part = &inp[b * block as usize..(b + 1) * block as usize];
            let sum: u32 = part.iter().sum();
            let odd = part.iter().filter(|&&v| v & 1 == 1).count() as u32;
            assert_eq!(
                &got[4 * b..4 * b + 4],
                &[sum, odd, part[part.len() - 1], sum],
                "block {b} of {block} threads"
            );
        }
    }
}

#[test]
fn neighbouring_16_bit_elements_do_not_conflict() {
    let x: Vec<u16> = (0..63 * 5).map(|i| i as u16).collect();
    let xb = sim_bytes(bytemuck::cast_slice(&x));
    let mut out = sim_bytes(&vec![0u8; 2 * x.len()]);
    launch(
        "sim_ok_halves",
        (5, 1, 1),
        (63, 1, 1),
        &mut [Arg::In(&xb), Arg::Out(&mut out)],
    )
    .unwrap();
    let got: Vec<u16> = bytemuck::pod_collect_to_vec(bytes_of(&out));
    for (i, &g) in got.iter().enumerate() {
        assert_eq!(g, (63 * (i / 63) + 62 - i % 63) as u16, "element {i}");
    }
}

#[test]
fn half_conversions_match_the_half_crate() {
    let mut x = vec![
        0.0f32,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        65519.0,
        65520.0,
        1e-8,
        -3e-6,
        6.1e-5,
        5.96e-8,
        2.98e-8,
        f32::INFINITY,
        f32::NEG_INFINITY,
        // 1 + 2^-11 and 1 + 3 * 2^-11: halfway between two f16 values (ties to even).
        f32::from_bits(0x3f80_1000),
        f32::from_bits(0x3f80_3000),
    ];
    let mut s = 0x1234_5678u32;
    for _ in 0..4000 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        let f = f32::from_bits(s);
        if f.is_finite() {
            x.push(f);
        }
    }
    let n = x.len();
    let xb = sim_bytes(bytemuck::cast_slice(&x));
    let mut out = sim_bytes(&vec![0u8; 8 * n]);
    launch(
        "sim_ok_convert",
        (n.div_ceil(128) as u32, 1, 1),
        (128, 1, 1),
        &mut [Arg::In(&xb), Arg::Out(&mut out), Arg::U32(n as u32)],
    )
    .unwrap();
    let got: Vec<f32> = bytemuck::pod_collect_to_vec(bytes_of(&out));
    for (i, &v) in x.iter().enumerate() {
        let h = half::f16::from_f32(v).to_f32();
        let b = half::bf16::from_f32(v).to_f32();
        assert_eq!(got[2 * i].to_bits(), h.to_bits(), "f16 of {v:e}");
        assert_eq!(got[2 * i + 1].to_bits(), b.to_bits(), "bf16 of {v:e}");
    }
}

#[test]
fn a_correct_kernel_passes_every_check() {
    // Same launch shapes as the failing cases below, without the defect.
    let got = run_xon("sim_bad_read_past_end", 2, 64, 129, 128, 128).unwrap();
    assert_eq!(got[127], 128.0);
}

#[test]
fn out_of_bounds_read_is_reported() {
    expect_failure(
        run_xon("sim_bad_read_past_end", 2, 64, 128, 128, 128),
        "sim_bad_read_past_end",
        &[
            "block (1,0,0), thread (63,0,0)",
            "out-of-bounds access: reads 4 bytes at byte 512 of parameter 0, a buffer of 512 bytes",
        ],
    );
}

#[test]
fn out_of_bounds_write_is_reported() {
    expect_failure(
        run_xon("sim_bad_write_past_end", 3, 64, 128, 128, 128),
        "sim_bad_write_past_end",
        &[
            "block (2,0,0), thread (0,0,0)",
            "writes 4 bytes at byte 512 of parameter 1",
        ],
    );
}

#[test]
fn write_to_an_input_is_reported() {
    expect_failure(
        run_xon("sim_bad_write_input", 1, 32, 32, 32, 32),
        "sim_bad_write_input",
        &["thread (0,0,0)", "writes to parameter 0, a read-only input"],
    );
}

#[test]
fn null_pointer_access_is_reported() {
    let mut out = sim_bytes(&[0u8; 128]);
    let r = launch(
        "sim_bad_read_past_end",
        (1, 1, 1),
        (32, 1, 1),
        &mut [Arg::Null, Arg::Out(&mut out), Arg::U32(32)],
    );
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("outside every buffer of the launch"), "{msg}");
}

#[test]
fn barrier_reached_by_part_of_the_block_is_reported() {
    expect_failure(
        run_xon("sim_bad_partial_barrier", 1, 64, 64, 64, 64),
        "sim_bad_partial_barrier",
        &[
            "barrier reached by part of the block: 32 of 64 threads",
            "thread (32,0,0) exited",
        ],
    );
}

#[test]
fn shuffle_with_exited_lanes_is_reported() {
    expect_failure(
        run_xon("sim_bad_diverged_shuffle", 1, 32, 32, 32, 32),
        "sim_bad_diverged_shuffle",
        &[
            "thread (0,0,0): warp divergence: it waits at __shfl_xor_sync (cuda/common.cuh:",
            "but lane 1 of its mask (thread (1,0,0)) exited",
        ],
    );
}

#[test]
fn shuffle_at_two_places_is_reported() {
    expect_failure(
        run_xon("sim_bad_split_shuffle", 1, 64, 64, 64, 64),
        "sim_bad_split_shuffle",
        &[
            "warp divergence: it waits at __shfl_xor_sync (cuda/sim/selftest.cu:",
            "waits at __shfl_xor_sync (cuda/sim/selftest.cu:",
        ],
    );
}

#[test]
fn full_mask_in_a_partial_warp_is_reported() {
    expect_failure(
        run_xon("sim_bad_partial_warp", 1, 48, 48, 48, 48),
        "sim_bad_partial_warp",
        &["thread (32,0,0)", "in a partial warp of 16 lanes"],
    );
}

#[test]
fn shared_write_write_race_is_reported() {
    expect_failure(
        run_xon("sim_bad_shared_race", 1, 32, 32, 32, 32),
        "sim_bad_shared_race",
        &[
            "thread (1,0,0)",
            "shared-memory race: writes shared memory that another thread wrote (thread (0,0,0))",
        ],
    );
}

#[test]
fn shared_read_before_the_barrier_is_reported() {
    expect_failure(
        run_xon("sim_bad_missing_barrier", 1, 32, 32, 32, 32),
        "sim_bad_missing_barrier",
        &[
            "thread (1,0,0)",
            "reads shared memory that another thread wrote (thread (0,0,0))",
        ],
    );
}

#[test]
fn read_of_unwritten_shared_memory_is_reported() {
    expect_failure(
        run_xon("sim_bad_uninit_shared", 1, 64, 64, 64, 64),
        "sim_bad_uninit_shared",
        &[
            "thread (0,0,0)",
            "reads shared memory that no thread of this block has written",
        ],
    );
}

#[test]
fn misaligned_vector_load_is_reported() {
    expect_failure(
        run_xon("sim_bad_misaligned", 1, 32, 256, 32, 1),
        "sim_bad_misaligned",
        &["misaligned 16-byte vector access", "cuda/common.cuh:"],
    );
}

#[test]
fn launch_shape_and_signature_mismatches_are_reported() {
    expect_failure(
        run_xon("sim_bad_bounded", 1, 128, 128, 128, 128),
        "sim_bad_bounded",
        &["block of 128 threads above its __launch_bounds__(64)"],
    );
    assert!(run_xon("sim_bad_bounded", 1, 64, 64, 64, 64).is_ok());
    let xb = sim_bytes(&[0u8; 64]);
    let mut out = sim_bytes(&[0u8; 64]);
    let wrong_kind = launch(
        "sim_bad_bounded",
        (1, 1, 1),
        (16, 1, 1),
        &mut [Arg::In(&xb), Arg::Out(&mut out), Arg::F32(16.0)],
    );
    let msg = wrong_kind.unwrap_err().to_string();
    assert!(
        msg.contains("argument 2: the host passes a float, the kernel takes a 32-bit integer"),
        "{msg}"
    );
    let wrong_count = launch(
        "sim_bad_bounded",
        (1, 1, 1),
        (16, 1, 1),
        &mut [Arg::In(&xb), Arg::Out(&mut out)],
    );
    let msg = wrong_count.unwrap_err().to_string();
    assert!(
        msg.contains("the host passes 2 arguments, the kernel takes 3"),
        "{msg}"
    );
    let big_grid = launch(
        "sim_bad_bounded",
        (1, 70_000, 1),
        (16, 1, 1),
        &mut [Arg::In(&xb), Arg::Out(&mut out), Arg::U32(16)],
    );
    assert!(
        big_grid.unwrap_err().to_string().contains("invalid grid"),
        "grid.y above 65535"
    );
    let unknown = launch("no_such_kernel", (1, 1, 1), (32, 1, 1), &mut []);
    assert!(unknown.unwrap_err().to_string().contains("no kernel named"));
}

#[test]
fn blocks_writing_the_same_output_are_reported() {
    expect_failure(
        run_xon("sim_bad_blocks_overlap", 2, 32, 64, 64, 64),
        "sim_bad_blocks_overlap",
        &[
            "block (1,0,0), thread (0,0,0)",
            "writes byte 0 of parameter 1, which block (0,0,0) wrote in this launch",
        ],
    );
    assert!(run_xon("sim_bad_blocks_overlap", 1, 32, 64, 64, 64).is_ok());
}

#[test]
fn reading_another_blocks_output_is_reported() {
    expect_failure(
        run_xon("sim_bad_reads_other_block", 2, 32, 64, 64, 64),
        "sim_bad_reads_other_block",
        &[
            "block (1,0,0), thread (0,0,0)",
            "reads byte 124 of parameter 1, which block (0,0,0) wrote in this launch",
        ],
    );
}
