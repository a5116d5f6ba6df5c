//! Scheduling rules, pure: can a worker run a job now and on which GPUs,
//! which of several waiting workers should get it, and why a job waits.
//! Used by the dispatch round in `db::dispatch` and by job detail.

use crate::lifecycle::WorkerState;
use drover_proto::GpuInfo;
use std::cmp::Reverse;

/// What a queued job needs.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    pub gpus: u32,
    pub min_vram_mb: u64,
    pub required_tags: Vec<String>,
    pub preferred_tags: Vec<String>,
    /// A GPU job that may run on a CPU slot when no GPU is free.
    pub cpu_fallback: bool,
}

/// What a worker offers right now.
#[derive(Debug, Clone, Default)]
pub struct Offer {
    pub worker_id: i64,
    pub tags: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    /// Indices of GPUs held by the worker's running jobs.
    pub busy_gpus: Vec<u32>,
    pub slots: u32,
    pub running: u32,
    /// Mean GPU utilization from the last heartbeat, 0..100.
    pub gpu_util: f64,
    /// When it was last given a job (a sequence number; 0: never). Among
    /// equally good workers the least recently given one wins.
    pub last_given: u64,
}

impl Offer {
    pub fn free_slots(&self) -> u32 {
        self.slots.saturating_sub(self.running)
    }

    /// GPUs of at least `min_vram_mb` not held by a job, lowest index first.
    fn free_gpus(&self, min_vram_mb: u64) -> Vec<u32> {
        let mut free: Vec<u32> = self
            .gpus
            .iter()
            .filter(|g| g.vram_mb >= min_vram_mb && !self.busy_gpus.contains(&g.index))
            .map(|g| g.index)
            .collect();
        free.sort_unstable();
        free
    }

    fn has_tags(&self, tags: &[String]) -> bool {
        tags.iter().all(|t| self.tags.contains(t))
    }

    /// Could this worker ever run the job (when empty)?
    pub fn could_host(&self, needs: &Needs) -> bool {
        self.has_tags(&needs.required_tags)
            && self.slots > 0
            && (needs.gpus == 0
                || needs.cpu_fallback
                || self
                    .gpus
                    .iter()
                    .filter(|g| g.vram_mb >= needs.min_vram_mb)
                    .count()
                    >= needs.gpus as usize)
    }

    /// Records a placement on this worker.
    pub fn take(&mut self, gpus: &[u32]) {
        self.running += 1;
        self.busy_gpus.extend_from_slice(gpus);
    }
}

/// The GPUs to give the job (empty for a CPU slot), or `None` when it does
/// not fit now: no free slot, a required tag missing, or too few free GPUs
/// with enough memory (and no CPU fallback). GPUs go lowest index first.
pub fn place(needs: &Needs, offer: &Offer) -> Option<Vec<u32>> {
    if offer.free_slots() == 0 || !offer.has_tags(&needs.required_tags) {
        return None;
    }
    if needs.gpus == 0 {
        return Some(Vec::new());
    }
    let free = offer.free_gpus(needs.min_vram_mb);
    if free.len() >= needs.gpus as usize {
        return Some(free[..needs.gpus as usize].to_vec());
    }
    needs.cpu_fallback.then(Vec::new)
}

/// How good a placement is; higher is better. In order: a GPU job placed on
/// GPUs (over a CPU fallback), a CPU job on a CPU worker (keeping GPU
/// workers free for GPU work), more preferred tags, then the least loaded
/// worker (share of slots in use, then GPU utilization), then the one given
/// a job least recently (equal workers take turns), then the lowest id.
fn score(needs: &Needs, offer: &Offer, gpus: &[u32]) -> impl Ord {
    let class = match (needs.gpus > 0, !gpus.is_empty(), offer.gpus.is_empty()) {
        (true, true, _) => 2,
        (true, false, _) => 0,
        (false, _, true) => 2,
        (false, _, false) => 1,
    };
    let preferred = needs
        .preferred_tags
        .iter()
        .filter(|t| offer.tags.contains(t))
        .count();
    let load_permille = (offer.running as u64 * 1000) / offer.slots.max(1) as u64;
    (
        class,
        preferred,
        Reverse(load_permille),
        Reverse((offer.gpu_util * 10.0) as i64),
        Reverse(offer.last_given),
        Reverse(offer.worker_id),
    )
}

/// The best of `offers` for the job, with its GPUs: (index into offers, GPUs).
pub fn best(
    needs: &Needs,
    offers: &[Offer],
    allowed: impl Fn(&Offer) -> bool,
) -> Option<(usize, Vec<u32>)> {
    offers
        .iter()
        .enumerate()
        .filter(|(_, o)| allowed(o))
        .filter_map(|(i, o)| place(needs, o).map(|g| (i, g)))
        .max_by_key(|(i, g)| score(needs, &offers[*i], g))
}

/// A worker as the explanation sees it: its state and what it could host.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub name: String,
    pub state: WorkerState,
    /// Its agent said it is shutting down: it takes nothing new.
    pub stopping: bool,
    pub offer: Offer,
}

impl WorkerView {
    /// May be given work now.
    pub fn takes_work(&self) -> bool {
        self.state.takes_work() && !self.stopping
    }

    /// Its state as an explanation names it.
    fn label(&self) -> &'static str {
        match self.stopping && self.state.takes_work() {
            true => "stopping",
            false => self.state.as_str(),
        }
    }
}

/// Why a queued, claimable job is not running, in one sentence.
pub fn explain(needs: &Needs, workers: &[WorkerView]) -> String {
    if workers.is_empty() {
        return "no worker is registered: start drover-agent on a machine".into();
    }
    let tagged: Vec<&WorkerView> = workers
        .iter()
        .filter(|w| w.offer.has_tags(&needs.required_tags))
        .collect();
    if tagged.is_empty() {
        return missing_tags(needs, workers);
    }
    let fits: Vec<&WorkerView> = tagged
        .iter()
        .copied()
        .filter(|w| w.offer.could_host(needs))
        .collect();
    if fits.is_empty() {
        return too_small(needs, &tagged);
    }
    let live = fits.iter().filter(|w| w.takes_work()).count();
    if live == 0 {
        let mut states: Vec<String> = fits
            .iter()
            .map(|w| format!("{} is {}", w.name, w.label()))
            .collect();
        states.truncate(5);
        return format!(
            "every worker that fits is unavailable ({})",
            states.join(", ")
        );
    }
    let what = if needs.gpus > 0 {
        format!("{} free GPU(s)", needs.gpus)
    } else {
        "a free slot".to_string()
    };
    format!("waiting for {what} on {live} worker(s) that fit")
}

/// No worker has every required tag: which tag nobody has, if any.
fn missing_tags(needs: &Needs, workers: &[WorkerView]) -> String {
    let missing: Vec<&str> = needs
        .required_tags
        .iter()
        .filter(|t| !workers.iter().any(|w| w.offer.tags.contains(t)))
        .map(String::as_str)
        .collect();
    if missing.contains(&drover_proto::LIMITS_TAG) {
        format!(
            "no worker can hold a job to memory and CPU limits (tag {}): that takes an agent \
             run by its systemd unit on cgroup v2 with the memory and cpu controllers",
            drover_proto::LIMITS_TAG
        )
    } else if missing.is_empty() {
        format!(
            "no worker has all the required tags [{}] together",
            needs.required_tags.join(", ")
        )
    } else {
        format!("no worker has tag {}", missing.join(", "))
    }
}

/// Workers with the tags exist but none could ever host the job: its GPUs
/// are too small, or too few on any one worker.
fn too_small(needs: &Needs, tagged: &[&WorkerView]) -> String {
    let largest = tagged
        .iter()
        .flat_map(|w| w.offer.gpus.iter().map(|g| g.vram_mb))
        .max()
        .unwrap_or(0);
    if needs.min_vram_mb > largest {
        return if largest == 0 {
            format!(
                "the job needs {} GPU(s) and no matching worker has a GPU",
                needs.gpus
            )
        } else {
            format!(
                "the largest GPU among matching workers has {largest} MB; the job needs {} MB per GPU",
                needs.min_vram_mb
            )
        };
    }
    let most = tagged
        .iter()
        .map(|w| {
            w.offer
                .gpus
                .iter()
                .filter(|g| g.vram_mb >= needs.min_vram_mb)
                .count()
        })
        .max()
        .unwrap_or(0);
    format!(
        "the job needs {} GPUs on one worker; the most any matching worker has is {most}",
        needs.gpus
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, vram_mb: u64) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            model: "Fake".into(),
            vram_mb,
        }
    }

    fn needs(gpus: u32, min_vram_mb: u64, tags: &[&str]) -> Needs {
        Needs {
            gpus,
            min_vram_mb,
            required_tags: tags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn offer(id: i64, gpus: Vec<GpuInfo>, slots: u32, running: u32, tags: &[&str]) -> Offer {
        Offer {
            worker_id: id,
            tags: tags.iter().map(|s| s.to_string()).collect(),
            gpus,
            busy_gpus: vec![],
            slots,
            running,
            gpu_util: 0.0,
            last_given: 0,
        }
    }

    #[test]
    fn equal_workers_take_turns() {
        let mut offers: Vec<Offer> = (1..=3).map(|id| offer(id, vec![], 1, 0, &[])).collect();
        offers[0].last_given = 7;
        offers[1].last_given = 3;
        offers[2].last_given = 5;
        let (i, _) = best(&needs(0, 0, &[]), &offers, |_| true).unwrap();
        assert_eq!(offers[i].worker_id, 2, "the one given a job least recently");
        offers[1].running = 1;
        offers[1].slots = 1;
        let (i, _) = best(&needs(0, 0, &[]), &offers, |_| true).unwrap();
        assert_eq!(offers[i].worker_id, 3, "load first, then turns");
    }

    #[test]
    fn placement_rules() {
        let mut o = offer(
            1,
            vec![gpu(0, 81920), gpu(1, 81920), gpu(2, 24576), gpu(3, 81920)],
            4,
            1,
            &["cuda12", "a100"],
        );
        o.busy_gpus = vec![1];
        let check = |n: Needs, expected: Option<Vec<u32>>| {
            assert_eq!(place(&n, &o), expected, "{n:?}");
        };
        check(needs(0, 0, &[]), Some(vec![]));
        check(needs(1, 0, &[]), Some(vec![0]));
        check(needs(2, 0, &[]), Some(vec![0, 2]));
        check(needs(2, 40000, &[]), Some(vec![0, 3]));
        check(needs(3, 40000, &[]), None);
        check(needs(3, 0, &[]), Some(vec![0, 2, 3]));
        check(needs(4, 0, &[]), None);
        check(needs(1, 100_000, &[]), None);
        check(needs(1, 0, &["cuda12"]), Some(vec![0]));
        check(needs(1, 0, &["cuda12", "a100"]), Some(vec![0]));
        check(needs(0, 0, &["h100"]), None);
        let fallback = Needs {
            cpu_fallback: true,
            ..needs(4, 0, &[])
        };
        check(fallback, Some(vec![]));
    }

    #[test]
    fn no_free_slot_no_job() {
        let full = offer(1, vec![], 1, 1, &[]);
        assert_eq!(place(&needs(0, 0, &[]), &full), None);
        let cpu = offer(1, vec![], 1, 0, &[]);
        assert_eq!(place(&needs(0, 0, &[]), &cpu), Some(vec![]));
        assert_eq!(place(&needs(1, 0, &[]), &cpu), None);
    }

    #[test]
    fn best_worker_rules() {
        let gpu_box = offer(1, vec![gpu(0, 24576), gpu(1, 24576)], 2, 0, &["a"]);
        let cpu_box = offer(2, vec![], 2, 0, &["a"]);
        let busy_cpu = offer(3, vec![], 2, 1, &["a", "fast"]);
        let all = vec![gpu_box.clone(), cpu_box.clone(), busy_cpu.clone()];
        let pick = |n: &Needs, offers: &[Offer]| {
            best(n, offers, |_| true).map(|(i, _)| offers[i].worker_id)
        };
        // A CPU job prefers a CPU worker, the least loaded one...
        assert_eq!(pick(&needs(0, 0, &[]), &all), Some(2));
        // ...unless a preferred tag says otherwise.
        let mut pref = needs(0, 0, &[]);
        pref.preferred_tags = vec!["fast".into()];
        assert_eq!(pick(&pref, &all), Some(3));
        // It uses a GPU worker's spare slot only when no CPU worker is free.
        let full_cpu = offer(2, vec![], 1, 1, &[]);
        assert_eq!(
            pick(&needs(0, 0, &[]), &[gpu_box.clone(), full_cpu]),
            Some(1)
        );
        // A GPU job goes to the GPU worker; with CPU fallback it still prefers GPUs.
        let mut fb = needs(1, 0, &[]);
        assert_eq!(pick(&fb, &all), Some(1));
        fb.cpu_fallback = true;
        assert_eq!(pick(&fb, &all), Some(1));
        let mut taken = gpu_box;
        taken.busy_gpus = vec![0, 1];
        taken.running = 1;
        assert_eq!(pick(&fb, &[taken.clone(), cpu_box]), Some(2));
        // Least loaded wins among equals; then the lowest id.
        let a = offer(5, vec![], 4, 3, &[]);
        let b = offer(6, vec![], 4, 1, &[]);
        let c = offer(7, vec![], 4, 1, &[]);
        assert_eq!(pick(&needs(0, 0, &[]), &[a, b, c]), Some(6));
        // Disallowed workers (reserved for another job) are skipped.
        let only = offer(8, vec![], 1, 0, &[]);
        assert_eq!(best(&needs(0, 0, &[]), &[only], |_| false), None);
    }

    #[test]
    fn explanations() {
        let w = |name: &str, state: &str, gpus: Vec<GpuInfo>, tags: &[&str]| WorkerView {
            name: name.into(),
            state: WorkerState::parse(state).unwrap(),
            stopping: false,
            offer: offer(1, gpus, 1, 1, tags),
        };
        let fleet = vec![
            w("small", "busy", vec![gpu(0, 24576)], &["cuda12"]),
            w("cpu", "idle", vec![], &["cuda12"]),
            w(
                "big",
                "draining",
                vec![gpu(0, 81920), gpu(1, 81920)],
                &["cuda12", "a100"],
            ),
        ];
        let check = |n: Needs, workers: &[WorkerView], expected: &str| {
            let got = explain(&n, workers);
            assert!(
                got.contains(expected),
                "{n:?}: {got:?} should say {expected:?}"
            );
        };
        check(needs(0, 0, &[]), &[], "no worker is registered");
        check(needs(0, 0, &["h100"]), &fleet, "no worker has tag h100");
        check(
            needs(1, 100_000, &[]),
            &fleet,
            "largest GPU among matching workers has 81920 MB",
        );
        check(
            needs(4, 0, &[]),
            &fleet,
            "the most any matching worker has is 2",
        );
        check(
            needs(2, 0, &["a100"]),
            &fleet,
            "every worker that fits is unavailable (big is draining)",
        );
        check(
            needs(1, 0, &[]),
            &fleet,
            "waiting for 1 free GPU(s) on 1 worker(s)",
        );
        check(
            needs(0, 0, &[]),
            &fleet,
            "waiting for a free slot on 2 worker(s)",
        );
    }
}
