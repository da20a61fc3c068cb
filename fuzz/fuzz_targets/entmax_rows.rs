//! Row softmax and α-entmax, every solver and backend, any α.
//!
//! Invariants: the host helpers and solvers return `Error::NonFinite` for a
//! NaN / `+inf` score, `Error::Alpha` for a bad α, otherwise probability
//! vectors (zeros for an all `-inf` row), `-inf` at 0, monotone in the
//! scores with equal ties. The backends agree with the reference: NaN rows
//! where it has them, else within 1e-5 per probability (entmax rows
//! contract) or softmax's 1e-5 relative. Halley and bisection agree with the
//! exact solver where they report convergence and α ≤ 2.
#![no_main]

use kvsieve::entmax::{
    EntmaxOptions, entmax_bisect, entmax_bisect_f64, entmax_exact_f64, entmax_halley,
    entmax_halley_f64, entmax15_exact, sparsemax_exact,
};
use kvsieve::reference::Reference;
use kvsieve::{Error, Ragged, ops};
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> Res<()> {
    let n = if u.ratio(1, 16)? {
        u.int_in_range(257..=4099)?
    } else {
        u.int_in_range(1..=64)?
    };
    let wild_row = u.arbitrary::<bool>()?;
    let scale = f32::from(u.int_in_range(1u8..=64)?) / 8.0;
    let mut z = Vec::with_capacity(n);
    for _ in 0..n {
        let x = if u.ratio(1, 8)? {
            f32::NEG_INFINITY
        } else if wild_row {
            wild(u)?
        } else {
            scale * tame(u)?
        };
        z.push(x);
    }
    let alpha = any_alpha(u)?;
    let valid_alpha = alpha.is_finite() && alpha > 1.0;
    let bad = z.iter().any(|x| x.is_nan() || *x == f32::INFINITY);
    let empty = z.iter().all(|&x| x == f32::NEG_INFINITY);
    let ctx = || format!("alpha {alpha} n {n} z {:?}", &z[..n.min(12)]);

    // Host helpers and solvers.
    match kvsieve::softmax(&z) {
        Err(Error::NonFinite { .. }) => assert!(bad, "{}", ctx()),
        Ok(p) => {
            assert!(!bad, "{}", ctx());
            assert_weights(&z, &p, empty, &|| format!("softmax {}", ctx()));
        }
        Err(e) => panic!("softmax: {e} ({})", ctx()),
    }
    let opts = [
        EntmaxOptions::default(),
        EntmaxOptions::new(100, 1e-12),
        EntmaxOptions::fixed_iterations(u.int_in_range(1u32..=8)?),
    ];
    let o = opts[u.choose_index(opts.len())?];
    let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
    let exact = entmax_exact_f64(&z64, f64::from(alpha));
    match &exact {
        Err(Error::Alpha { .. }) => assert!(!valid_alpha, "{}", ctx()),
        Err(Error::NonFinite { .. }) => assert!(bad && valid_alpha, "{}", ctx()),
        Err(e) => panic!("entmax_exact_f64: {e} ({})", ctx()),
        Ok((p, _)) => {
            let p: Vec<f32> = p.iter().map(|&x| x as f32).collect();
            assert_weights(&z, &p, empty, &|| format!("exact {}", ctx()));
            let helper = kvsieve::entmax(&z, alpha).expect("entmax helper");
            assert_all_close(&helper, &p, 0.0, 1e-7, &|| format!("helper {}", ctx()));
        }
    }
    for (name, r) in [
        ("halley", entmax_halley(&z, alpha, &o)),
        ("bisect", entmax_bisect(&z, alpha, &o)),
    ] {
        match r {
            Err(Error::Alpha { .. }) => assert!(!valid_alpha, "{name} {}", ctx()),
            Err(Error::NonFinite { .. }) => assert!(bad, "{name} {}", ctx()),
            Err(e) => panic!("{name}: {e} ({})", ctx()),
            Ok(r) => {
                let c = || format!("{name} {o:?} {}", ctx());
                assert_weights(&z, &r.probs, empty, &c);
                if let (true, true, Ok((pe, _))) = (r.converged, alpha <= 2.0, &exact) {
                    let pe: Vec<f32> = pe.iter().map(|&x| x as f32).collect();
                    // |f| < tol moves each weight by about 2·tol (α ≤ 2).
                    let abs = 1e-6 + 4.0 * o.tol;
                    assert_all_close(&r.probs, &pe, 0.0, abs, &c);
                }
            }
        }
    }
    for (name, r) in [
        ("halley_f64", entmax_halley_f64(&z64, f64::from(alpha), &o)),
        ("bisect_f64", entmax_bisect_f64(&z64, f64::from(alpha), &o)),
    ] {
        if let Ok(r) = r {
            let p: Vec<f32> = r.probs.iter().map(|&x| x as f32).collect();
            assert_weights(&z, &p, empty, &|| format!("{name} {}", ctx()));
        }
    }
    if !bad {
        for (name, r) in [
            ("sparsemax", sparsemax_exact(&z64)),
            ("entmax15", entmax15_exact(&z64)),
        ] {
            let (p, _) = r.expect("finite row");
            let p: Vec<f32> = p.iter().map(|&x| x as f32).collect();
            assert_weights(&z, &p, empty, &|| format!("{name} {}", ctx()));
        }
    }

    // Backends: one or two rows (same row twice checks row independence).
    let rows = if u.arbitrary()? {
        Ragged::uniform(1, n).unwrap()
    } else {
        Ragged::uniform(2, n).unwrap()
    };
    let x: Vec<f32> = (0..rows.num_segments())
        .flat_map(|_| z.iter().copied())
        .collect();
    let cpu = cpu(u)?;
    let (mut want, mut got) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
    ops::softmax_rows(&Reference, &rows, &x, &mut want).expect("softmax_rows");
    ops::softmax_rows(&cpu, &rows, &x, &mut got).expect("softmax_rows");
    assert_all_close(&got, &want, 1e-5, 1e-6, &|| {
        format!("softmax_rows {:?} {}", cpu.isa(), ctx())
    });
    let r = ops::entmax_rows(&Reference, &rows, &[alpha], &x, &mut want);
    let c = ops::entmax_rows(&cpu, &rows, &[alpha], &x, &mut got);
    assert_eq!(r.is_ok(), c.is_ok(), "{}", ctx());
    if r.is_ok() {
        assert!(valid_alpha, "{}", ctx());
        assert_all_close(&got, &want, 0.0, 1e-5, &|| {
            format!("entmax_rows {:?} {}", cpu.isa(), ctx())
        });
        if !bad {
            assert_weights(&z, &got[..n], empty, &|| {
                format!("cpu entmax_rows {}", ctx())
            });
        }
    } else {
        assert!(!valid_alpha, "{}", ctx());
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
