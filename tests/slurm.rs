//! Sweeps through a real Slurm: a one-node cluster (Debian's slurmctld, slurmd and munge) that
//! each test starts in a temporary folder with its own ports, sockets and state, and stops.
//!
//! Where the daemons cannot start (no packages, not root, no munge key) the tests print
//! `SKIPPED slurm: <reason>` (counted by `.ci/run`, see `firmware_protocol::skipped`) and pass; set `PNN_REQUIRE_SLURM=1` to make that a failure.
//! `.ci/run` installs the packages. Run: `cargo test --release --test slurm -- --nocapture`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pnn::report::metrics::RunSummary;
use pnn::sweep::SweepDir;
use pnn::sweep::cell::{CellDir, LOG_FILE};

const SWEEP: &str = env!("CARGO_BIN_EXE_pnn-sweep");
const TRAIN: &str = env!("CARGO_BIN_EXE_pnn-train");

/// A running one-node Slurm cluster; stopped (jobs cancelled, daemons ended) when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    daemons: Vec<Child>,
    munged_pid: Option<u32>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn found(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > limit {
            return Err(format!("{what} within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

impl Cluster {
    /// Starts munged, slurmctld and slurmd, or says why it cannot.
    fn start() -> Result<Self, String> {
        for p in [
            "munged",
            "slurmctld",
            "slurmd",
            "sbatch",
            "squeue",
            "scontrol",
            "runuser",
        ] {
            if !found(p) {
                return Err(format!(
                    "{p} is not installed (apt-get install -y slurmctld slurmd slurm-client munge)"
                ));
            }
        }
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("slurmd runs jobs as root here (SlurmdUser=root): run as root".into());
        }
        if !Path::new("/etc/munge/munge.key").exists() {
            return Err("/etc/munge/munge.key is missing (the munge package creates it)".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("pnn-slurm-")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let root = dir.path().to_path_buf();
        let munge = root.join("munge");
        for d in ["munge", "state", "spool", "log"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
        }
        // munged wants its socket folder reachable by everyone and owned by its user.
        let sh = |cmd: String| {
            Command::new("sh")
                .args(["-c", &cmd])
                .status()
                .map_err(|e| e.to_string())
                .and_then(|s| s.success().then_some(()).ok_or(format!("`{cmd}` failed")))
        };
        sh(format!(
            "chmod 755 {0} && chown munge:munge {1} && chmod 755 {1}",
            root.display(),
            munge.display()
        ))?;
        let socket = munge.join("socket");
        let mut cluster = Cluster {
            conf: root.join("slurm.conf"),
            dir,
            daemons: Vec::new(),
            munged_pid: None,
        };
        let status = Command::new("runuser")
            .args(["-u", "munge", "--", "munged"])
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", munge.join("pid").display()))
            .arg(format!("--log-file={}", munge.join("log").display()))
            .arg(format!("--seed-file={}", munge.join("seed").display()))
            .status()
            .map_err(|e| format!("cannot start munged: {e}"))?;
        if !status.success() {
            return Err(format!(
                "munged did not start: {}",
                std::fs::read_to_string(munge.join("log")).unwrap_or_default()
            ));
        }
        wait_for("munged's pid file", Duration::from_secs(5), || {
            munge.join("pid").exists()
        })?;
        cluster.munged_pid = std::fs::read_to_string(munge.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|e| e.to_string())?
            .trim()
            .to_string();
        let host = host.split('.').next().unwrap_or(&host).to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let r = root.display();
        let conf = format!(
            "ClusterName=pnntest\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmUser=root\nSlurmdUser=root\n\
             SlurmctldPort={}\nSlurmdPort={}\n\
             AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={}\n\
             StateSaveLocation={r}/state\nSlurmdSpoolDir={r}/spool\n\
             SlurmctldPidFile={r}/slurmctld.pid\nSlurmdPidFile={r}/slurmd.pid\n\
             SlurmctldLogFile={r}/log/slurmctld.log\nSlurmdLogFile={r}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
             SchedulerType=sched/builtin\nMpiDefault=none\nReturnToService=2\n\
             JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
             MinJobAge=300\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN\n\
             PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            free_port().map_err(|e| e.to_string())?,
            free_port().map_err(|e| e.to_string())?,
            socket.display(),
        );
        std::fs::write(&cluster.conf, conf).map_err(|e| e.to_string())?;
        for daemon in ["slurmctld", "slurmd"] {
            let child = Command::new(daemon)
                .arg("-D")
                .arg("-f")
                .arg(&cluster.conf)
                .env("SLURM_CONF", &cluster.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {daemon}: {e}"))?;
            cluster.daemons.push(child);
        }
        let conf = cluster.conf.clone();
        wait_for("the node to come up idle", Duration::from_secs(20), || {
            Command::new("sinfo")
                .args(["--noheader", "--format=%T"])
                .env("SLURM_CONF", &conf)
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
        })
        .map_err(|e| {
            format!(
                "{e}; slurmctld log: {}",
                std::fs::read_to_string(root.join("log/slurmctld.log")).unwrap_or_default()
            )
        })?;
        Ok(cluster)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// `%T %r` (state and reason) of a job or array task, or "" once Slurm has forgotten it.
    fn job_state(&self, job: &str) -> String {
        let out = self.run("squeue", &["--noheader", "--format=%T %r", "--jobs", job]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.command("scancel").arg("--user=root").status();
        for d in &mut self.daemons {
            let _ = Command::new("kill").arg(d.id().to_string()).status();
        }
        for d in &mut self.daemons {
            let start = Instant::now();
            while matches!(d.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        if let Some(pid) = self.munged_pid {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = &self.dir;
    }
}

/// The cluster, or `None` after printing why the test is skipped.
fn cluster() -> Option<Cluster> {
    match Cluster::start() {
        Ok(c) => Some(c),
        Err(reason) => {
            if std::env::var_os("PNN_REQUIRE_SLURM").is_some() {
                panic!("Slurm is required (PNN_REQUIRE_SLURM) but cannot start: {reason}");
            }
            firmware_protocol::skipped::skipped("slurm", &reason);
            None
        }
    }
}

fn submit(cluster: &Cluster, sweep: &Path, out: &Path) -> String {
    let o = cluster
        .command(SWEEP)
        .arg("slurm")
        .arg(sweep)
        .arg("--out")
        .arg(out)
        .args(["--max-concurrent", "4"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pnn-sweep slurm: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(id.parse::<u64>().is_ok(), "a job id on stdout: {id:?}");
    id
}

fn wait_done(dir: &SweepDir, cells: usize, limit: Duration) {
    wait_for("every cell to finish", limit, || {
        (0..cells).all(|i| CellDir(dir.cell_dir(i)).summary().is_some())
    })
    .unwrap_or_else(|e| {
        let logs: Vec<String> = (0..cells)
            .map(|i| {
                std::fs::read_to_string(CellDir(dir.cell_dir(i)).file(LOG_FILE)).unwrap_or_default()
            })
            .collect();
        let slurm: Vec<String> = std::fs::read_dir(dir.slurm_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
            .collect();
        panic!(
            "not {e}; cell logs:\n{}\nSlurm's output:\n{}",
            logs.join("\n"),
            slurm.join("\n")
        )
    });
}

/// A local, uninterrupted `pnn-train` run of the cell's config (checkpoints, which the config
/// may ask for, go to a folder of its own): what the cell must have ended with.
fn local_run(dir: &SweepDir, index: usize) -> RunSummary {
    let checkpoints = tempfile::tempdir().unwrap();
    let out = Command::new(TRAIN)
        .arg("--config")
        .arg(CellDir(dir.cell_dir(index)).file("config.ron"))
        .arg("--checkpoint")
        .arg(checkpoints.path().join("ck"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

/// Everything but the timings.
fn figures(s: &RunSummary) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap();
    let m = v.as_object_mut().unwrap();
    m.remove("train_seconds");
    m.remove("seconds_per_epoch");
    v
}

#[test]
fn a_sweep_runs_as_a_slurm_array_and_every_cell_equals_a_local_run() {
    let Some(cluster) = cluster() else { return };
    let work = tempfile::tempdir().unwrap();
    let sweep = work.path().join("lr.ron");
    std::fs::write(
        &sweep,
        r#"(
            name: "lr-by-seed",
            base: (dataset: "mnist", epochs: 2, limit_train: 300, limit_test: 200, batch_size: 50),
            grid: {"lr": [1e-3, 1e-2]},
            seeds: [0, 1],
        )"#,
    )
    .unwrap();
    let out = work.path().join("out");
    let start = Instant::now();
    let job = submit(&cluster, &sweep, &out);
    let dir = SweepDir::new(&out);
    let status = Command::new(SWEEP)
        .arg("status")
        .arg(&out)
        .env("SLURM_CONF", &cluster.conf)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&status.stderr).contains(&format!("(Slurm jobs {job})")),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    wait_done(&dir, 4, Duration::from_secs(60));
    eprintln!("4 array tasks of job {job} done in {:?}", start.elapsed());
    let gathered = Command::new(SWEEP)
        .arg("gather")
        .arg(&out)
        .output()
        .unwrap();
    assert!(gathered.status.success());
    let table = std::fs::read_to_string(out.join("gather/table.md")).unwrap();
    assert!(table.contains("4 of 4 cells done"), "{table}");
    assert!(table.contains("| 0.01 | 2/2 |"), "{table}");
    let csv = std::fs::read_to_string(out.join("gather/cells.csv")).unwrap();
    for i in 0..4 {
        let swept = CellDir(dir.cell_dir(i)).summary().unwrap();
        let local = local_run(&dir, i);
        assert_eq!(figures(&swept), figures(&local), "cell {i}");
        assert!(csv.contains(&local.weights_sha256), "cell {i} in cells.csv");
    }
    // Submitting a done sweep again submits nothing.
    let again = cluster
        .command(SWEEP)
        .arg("slurm")
        .arg(&sweep)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).trim().is_empty());
}

#[test]
fn a_requeued_task_resumes_its_cell_and_ends_with_the_weights_of_an_uninterrupted_run() {
    let Some(cluster) = cluster() else { return };
    let work = tempfile::tempdir().unwrap();
    let sweep = work.path().join("one.ron");
    // Long enough (several seconds on one core) to be caught running; a checkpoint every 5
    // batches, so the requeued task has one to resume from.
    std::fs::write(
        &sweep,
        r#"(
            base: (dataset: "mnist", hidden: [100, 100], epochs: 6, limit_train: 20000,
                   limit_test: 500, checkpoint_every: 5),
            seeds: [3],
        )"#,
    )
    .unwrap();
    let out = work.path().join("out");
    let job = submit(&cluster, &sweep, &out);
    let task = format!("{job}_0");
    let dir = SweepDir::new(&out);
    let cell = CellDir(dir.cell_dir(0));
    // Requeue once the first epoch is done (and saved): the resumed run must start past it.
    wait_for("the first epoch", Duration::from_secs(30), || {
        std::fs::read_to_string(cell.file("metrics.jsonl")).is_ok_and(|m| !m.is_empty())
    })
    .unwrap();
    // Slurm refuses to requeue a task that is still launching; try until it takes.
    wait_for("scontrol requeue to take", Duration::from_secs(10), || {
        cluster
            .run("scontrol", &["requeue", &task])
            .status
            .success()
    })
    .unwrap();
    assert!(
        cell.summary().is_none(),
        "the task finished before it was requeued: make the run longer"
    );
    // A requeued job waits about two minutes before it may start again; let it start now.
    wait_for(
        "the task to wait for its begin time",
        Duration::from_secs(10),
        || cluster.job_state(&task) == "PENDING BeginTime",
    )
    .unwrap();
    wait_for("the task to start again", Duration::from_secs(20), || {
        cluster.run(
            "scontrol",
            &["update", &format!("JobId={task}"), "StartTime=now"],
        );
        std::thread::sleep(Duration::from_millis(500));
        cluster.job_state(&task) != "PENDING BeginTime"
    })
    .unwrap();
    wait_done(&dir, 1, Duration::from_secs(60));
    let log = std::fs::read_to_string(cell.file(LOG_FILE)).unwrap();
    assert!(log.contains("--- resumed"), "the task resumed: {log}");
    assert!(
        !log.contains("at epoch 1, batch 0"),
        "it resumed past the first epoch: {log}"
    );
    let requeued = cell.summary().unwrap();
    let uninterrupted = local_run(&dir, 0);
    assert_eq!(requeued.weights_sha256, uninterrupted.weights_sha256);
    assert_eq!(figures(&requeued), figures(&uninterrupted));
    // Every epoch's metrics are there once, across the two attempts.
    let metrics = std::fs::read_to_string(cell.file("metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, [1, 2, 3, 4, 5, 6]);
}
