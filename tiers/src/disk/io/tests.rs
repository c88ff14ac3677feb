//! Tests of the engines on a real file: batches, pipelines, fixed
//! buffers, injected faults and deadlines, on both engines (io_uring only
//! where the kernel allows it).

use super::*;
use std::os::fd::AsRawFd;
use std::sync::mpsc;

fn tmpfile(len: usize) -> (tempfile::TempDir, std::fs::File) {
    let dir = tempfile::Builder::new()
        .prefix("kvs-engine")
        .tempdir()
        .unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; len]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    (dir, f)
}

fn engines(faults: &Arc<FaultCell>) -> Vec<Box<dyn IoEngine>> {
    let mut v: Vec<Box<dyn IoEngine>> =
        vec![Box::new(PreadEngine::start(2, Arc::clone(faults)).unwrap())];
    match UringEngine::start(32, Arc::clone(faults)) {
        Ok(u) => v.push(Box::new(u)),
        Err(e) => eprintln!("io_uring unavailable here: {e}"),
    }
    v
}

/// Writes of 8 KiB at offsets 0, 8 KiB, ... filled with 1, 2, ... 8.
fn eight_writes(fd: RawFd) -> Vec<IoOp> {
    (0..8u8)
        .map(|i| {
            let mut buf = AlignedBuf::zeroed(8192).unwrap();
            buf.as_mut_slice().fill(i + 1);
            IoOp {
                kind: OpKind::Write,
                fd,
                offset: i as u64 * 8192,
                buf,
                on_late: None,
            }
        })
        .collect()
}

#[test]
fn batch_write_then_read() {
    let faults = FaultCell::new(FaultPlan::default());
    for engine in engines(&faults) {
        let (_d, f) = tmpfile(64 * 1024);
        let ops = eight_writes(f.as_raw_fd());
        let done = run(&*engine, ops, Instant::now() + Duration::from_secs(5));
        assert!(
            done.iter().all(|d| d.result.is_ok()),
            "{}: {done:?}",
            engine.name()
        );
        let ops: Vec<_> = (0..8u8)
            .map(|i| IoOp {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: i as u64 * 8192,
                buf: AlignedBuf::zeroed(8192).unwrap(),
                on_late: None,
            })
            .collect();
        let done = run(&*engine, ops, Instant::now() + Duration::from_secs(5));
        for (i, d) in done.iter().enumerate() {
            assert!(d.result.is_ok());
            assert!(
                d.buf
                    .as_ref()
                    .unwrap()
                    .as_slice()
                    .iter()
                    .all(|&b| b == i as u8 + 1)
            );
        }
    }
}

/// Transfers from the registered region (READ_FIXED / WRITE_FIXED)
/// and from the heap, mixed in one batch, with a fault on the fixed path.
#[test]
fn fixed_buffers_round_trip() {
    let faults = FaultCell::new(FaultPlan::default());
    let pool = BufPool::with_arena(1 << 20, 6 * 8192);
    let engine =
        match UringEngine::start_with_pool(32, Arc::clone(&faults), Some(Arc::clone(&pool))) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("io_uring unavailable here: {e}");
                return;
            }
        };
    if !engine.fixed_buffers() {
        eprintln!("fixed buffers not registered here; plain transfers tested");
    }
    let (_d, f) = tmpfile(64 * 1024);
    let (base, len) = pool.region().unwrap();
    let in_region = |b: &AlignedBuf| {
        let p = b.as_ptr() as usize;
        p >= base as usize && p + b.len() <= base as usize + len
    };
    // Six buffers fill the region; the last two come from the heap.
    let bufs: Vec<AlignedBuf> = (0..8).map(|_| pool.get(8192).unwrap()).collect();
    assert_eq!(bufs.iter().filter(|b| in_region(b)).count(), 6);
    let ops: Vec<_> = bufs
        .into_iter()
        .enumerate()
        .map(|(i, mut buf)| {
            buf.as_mut_slice().fill(i as u8 + 1);
            IoOp {
                kind: OpKind::Write,
                fd: f.as_raw_fd(),
                offset: i as u64 * 8192,
                buf,
                on_late: None,
            }
        })
        .collect();
    let done = run(&engine, ops, Instant::now() + Duration::from_secs(5));
    assert!(done.iter().all(|d| d.result.is_ok()), "{done:?}");
    drop(done);
    let reads = |n: u64| -> Vec<IoOp> {
        (0..n)
            .map(|i| IoOp {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: (7 - i) * 8192,
                buf: pool.get(8192).unwrap(),
                on_late: None,
            })
            .collect()
    };
    let done = run(&engine, reads(8), Instant::now() + Duration::from_secs(5));
    for (i, d) in done.iter().enumerate() {
        assert!(d.result.is_ok(), "{i}: {d:?}");
        let want = 8 - i as u8;
        assert!(
            d.buf
                .as_ref()
                .unwrap()
                .as_slice()
                .iter()
                .all(|&b| b == want)
        );
    }
    drop(done);
    // Faults apply to fixed transfers as to plain ones.
    faults.set(FaultPlan {
        short_reads: true,
        ..FaultPlan::default()
    });
    let done = run(&engine, reads(1), Instant::now() + Duration::from_secs(5));
    assert_eq!(
        done[0].result,
        Err(IoFailure::Short {
            done: 4096,
            want: 8192
        })
    );
    faults.set(FaultPlan {
        fail_writes_with: Some(libc::ENOSPC),
        ..FaultPlan::default()
    });
    let op = IoOp {
        kind: OpKind::Write,
        fd: f.as_raw_fd(),
        offset: 0,
        buf: pool.get(8192).unwrap(),
        on_late: None,
    };
    let done = run(&engine, vec![op], Instant::now() + Duration::from_secs(5));
    assert_eq!(done[0].result, Err(IoFailure::Errno(libc::ENOSPC)));
    drop(done);
    faults.set(FaultPlan::default());
    // The engine holds the pool: dropping ours first is fine.
    drop(pool);
    drop(engine);
}

#[test]
fn batch_starts_each_op_as_it_is_added() {
    let faults = FaultCell::new(FaultPlan::default());
    for engine in engines(&faults) {
        let (_d, f) = tmpfile(64 * 1024);
        let mut batch = Batch::new(&*engine, 8);
        for i in 0..8u8 {
            let mut buf = AlignedBuf::zeroed(8192).unwrap();
            buf.as_mut_slice().fill(i + 1);
            batch.submit(IoOp {
                kind: OpKind::Write,
                fd: f.as_raw_fd(),
                offset: i as u64 * 8192,
                buf,
                on_late: None,
            });
        }
        assert_eq!(batch.len(), 8);
        let done = batch.wait(Instant::now() + Duration::from_secs(5));
        assert!(
            done.iter().all(|d| d.result.is_ok() && d.buf.is_some()),
            "{}: {done:?}",
            engine.name()
        );
        // Staged reads start with `wait`, results in the order added.
        let mut batch = Batch::new(&*engine, 8);
        for i in (0..8u8).rev() {
            batch.push(IoOp {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: i as u64 * 8192,
                buf: AlignedBuf::zeroed(8192).unwrap(),
                on_late: None,
            });
        }
        let done = batch.wait(Instant::now() + Duration::from_secs(5));
        for (k, d) in done.iter().enumerate() {
            let want = 8 - k as u8;
            let buf = d.buf.as_ref().unwrap();
            assert!(
                buf.as_slice().iter().all(|&b| b == want),
                "{}",
                engine.name()
            );
        }
        assert!(Batch::new(&*engine, 0).wait(Instant::now()).is_empty());
    }
}

#[test]
fn wait_each_hands_out_every_op_once() {
    let faults = FaultCell::new(FaultPlan::default());
    for engine in engines(&faults) {
        let (_d, f) = tmpfile(64 * 1024);
        let read = |i: u64, late: Option<Box<dyn FnOnce() + Send>>| IoOp {
            kind: OpKind::Read,
            fd: f.as_raw_fd(),
            offset: i * 8192,
            buf: AlignedBuf::zeroed(8192).unwrap(),
            on_late: late,
        };
        let mut batch = Batch::new(&*engine, 8);
        for i in 0..8 {
            batch.submit(read(i, None));
        }
        let mut seen = [0u8; 8];
        batch.wait_each(Instant::now() + Duration::from_secs(5), |i, d| {
            assert!(d.result.is_ok() && d.buf.is_some(), "{}", engine.name());
            seen[i] += 1;
        });
        assert_eq!(seen, [1; 8], "{}", engine.name());

        // At the deadline the ops in flight are handed out as timeouts;
        // their buffers are released later, by the engine.
        faults.set(FaultPlan {
            delay_reads: Some(Duration::from_millis(300)),
            ..FaultPlan::default()
        });
        let (tx, rx) = mpsc::channel();
        let mut batch = Batch::new(&*engine, 2);
        for i in 0..2 {
            let tx = tx.clone();
            batch.push(read(
                i,
                Some(Box::new(move || {
                    let _ = tx.send(i);
                })),
            ));
        }
        let t0 = Instant::now();
        let mut timeouts = 0;
        batch.wait_each(Instant::now() + Duration::from_millis(50), |_, d| {
            assert_eq!(d.result, Err(IoFailure::Timeout));
            assert!(d.buf.is_none());
            timeouts += 1;
        });
        assert_eq!(timeouts, 2, "{}", engine.name());
        assert!(t0.elapsed() < Duration::from_millis(250));
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        faults.set(FaultPlan::default());
    }
}

/// A pipeline keeps a window of `depth` ops in flight, refilled as
/// each completes; every op is handed out once, its state is dropped
/// once handed out, and an overdue op is abandoned alone.
#[test]
fn pipeline_refills_its_window_and_abandons_each_op_alone() {
    let faults = FaultCell::new(FaultPlan::default());
    for engine in engines(&faults) {
        let (_d, f) = tmpfile(64 * 1024);
        let ops = eight_writes(f.as_raw_fd());
        assert!(
            run(&*engine, ops, Instant::now() + Duration::from_secs(5))
                .iter()
                .all(|d| d.result.is_ok())
        );
        let read = |i: u64, late: Option<Box<dyn FnOnce() + Send>>| IoOp {
            kind: OpKind::Read,
            fd: f.as_raw_fd(),
            offset: (i % 8) * 8192,
            buf: AlignedBuf::zeroed(8192).unwrap(),
            on_late: late,
        };
        let depth = 3;
        let total = 40u64;
        let mut pipe = Pipeline::new(&*engine, depth);
        let mut what = std::collections::HashMap::new();
        let mut next = 0u64;
        let mut seen = vec![0u8; total as usize];
        let mut out = Vec::new();
        let mut outstanding = std::collections::BTreeSet::new();
        while next < total || pipe.open() > 0 {
            while pipe.open() < depth && next < total {
                let i = pipe.push(read(next, None), Instant::now() + Duration::from_secs(5));
                assert_eq!(i as u64, next, "indices count up from 0");
                what.insert(i, next);
                outstanding.insert(i);
                next += 1;
            }
            assert!(pipe.open() <= depth);
            out.clear();
            pipe.wait_some(&mut out);
            assert!(!out.is_empty(), "{}", engine.name());
            for (i, d) in out.drain(..) {
                assert!(outstanding.remove(&i), "{i} handed out once");
                let block = what[&i];
                seen[block as usize] += 1;
                assert!(d.result.is_ok(), "{}: {d:?}", engine.name());
                let want = (block % 8) as u8 + 1;
                assert!(d.buf.unwrap().as_slice().iter().all(|&b| b == want));
            }
            // Only the window's state is kept: from the oldest operation
            // not handed out to the newest (ops complete out of order, so
            // this can be wider than `depth`), and no handed-out op keeps
            // its result there.
            let st = pipe.shared.state.lock();
            let oldest = outstanding.first().copied().unwrap_or(next as usize);
            assert_eq!(st.base, oldest, "{}", engine.name());
            assert_eq!(st.base + st.results.len(), next as usize);
            for (pos, r) in st.results.iter().enumerate() {
                assert!(r.is_none() || outstanding.contains(&(st.base + pos)));
            }
        }
        assert!(pipe.shared.state.lock().results.is_empty());
        assert_eq!(seen, vec![1u8; total as usize], "{}", engine.name());
        pipe.wait_some(&mut out);
        assert!(out.is_empty());

        // One op overdue, one not: the overdue one is handed out as a
        // timeout on its own deadline, the other completes normally.
        faults.set(FaultPlan {
            delay_reads: Some(Duration::from_millis(400)),
            ..FaultPlan::default()
        });
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        let late = pipe.push(
            read(
                0,
                Some(Box::new(move || {
                    let _ = tx.send(());
                })),
            ),
            Instant::now() + Duration::from_millis(50),
        );
        let patient = pipe.push(read(1, None), Instant::now() + Duration::from_secs(5));
        pipe.wait_some(&mut out);
        assert_eq!(out.len(), 1, "{}", engine.name());
        assert_eq!(out[0].0, late);
        assert_eq!(out[0].1.result, Err(IoFailure::Timeout));
        assert!(out[0].1.buf.is_none());
        assert!(t0.elapsed() < Duration::from_millis(350));
        assert_eq!(pipe.open(), 1);
        out.clear();
        pipe.wait_some(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, patient);
        assert!(out[0].1.result.is_ok(), "{}", engine.name());
        // The abandoned op's hook ran once the kernel was done with it.
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        faults.set(FaultPlan::default());
    }
}

#[test]
fn dropped_batch_abandons_what_is_in_flight() {
    let faults = FaultCell::new(FaultPlan::default());
    for engine in engines(&faults) {
        let (_d, f) = tmpfile(64 * 1024);
        let (tx, rx) = mpsc::channel::<&'static str>();
        let read = |tag: &'static str| {
            let tx = tx.clone();
            IoOp {
                kind: OpKind::Read,
                fd: f.as_raw_fd(),
                offset: 0,
                buf: AlignedBuf::zeroed(8192).unwrap(),
                on_late: Some(Box::new(move || {
                    let _ = tx.send(tag);
                })),
            }
        };
        faults.set(FaultPlan {
            delay_reads: Some(Duration::from_millis(200)),
            ..FaultPlan::default()
        });
        let mut batch = Batch::new(&*engine, 2);
        batch.submit(read("started"));
        batch.push(read("staged"));
        drop(batch);
        // The staged op never started: released at once. The started
        // one only once the engine is done with its buffer.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(1)).unwrap(),
            "staged",
            "{}",
            engine.name()
        );
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            "started",
            "{}",
            engine.name()
        );
        faults.set(FaultPlan::default());
    }
}

#[test]
fn faults_and_deadlines() {
    let faults = FaultCell::new(FaultPlan::default());
    for engine in engines(&faults) {
        let (_d, f) = tmpfile(64 * 1024);
        let read = |late: Option<Box<dyn FnOnce() + Send>>| IoOp {
            kind: OpKind::Read,
            fd: f.as_raw_fd(),
            offset: 0,
            buf: AlignedBuf::zeroed(8192).unwrap(),
            on_late: late,
        };
        faults.set(FaultPlan {
            fail_reads_with: Some(libc::EIO),
            ..FaultPlan::default()
        });
        let d = run(
            &*engine,
            vec![read(None)],
            Instant::now() + Duration::from_secs(5),
        );
        assert_eq!(
            d[0].result,
            Err(IoFailure::Errno(libc::EIO)),
            "{}",
            engine.name()
        );
        faults.set(FaultPlan {
            short_reads: true,
            ..FaultPlan::default()
        });
        let d = run(
            &*engine,
            vec![read(None)],
            Instant::now() + Duration::from_secs(5),
        );
        assert_eq!(
            d[0].result,
            Err(IoFailure::Short {
                done: 4096,
                want: 8192
            }),
            "{}",
            engine.name()
        );
        faults.set(FaultPlan {
            delay_reads: Some(Duration::from_millis(300)),
            ..FaultPlan::default()
        });
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        let d = run(
            &*engine,
            vec![read(Some(Box::new(move || {
                let _ = tx.send(());
            })))],
            Instant::now() + Duration::from_millis(50),
        );
        assert_eq!(d[0].result, Err(IoFailure::Timeout), "{}", engine.name());
        assert!(t0.elapsed() < Duration::from_millis(250));
        // The late hook runs once the kernel is done with the buffer.
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        faults.set(FaultPlan::default());
    }
}
