//! Can this worker run this job now, and on which GPUs? Pure rules, used by
//! the claim transaction in `db::jobs`.

use drover_proto::GpuInfo;

/// What a queued job needs.
#[derive(Debug, Clone)]
pub struct Needs {
    pub gpus: u32,
    pub min_vram_mb: u64,
    pub required_tags: Vec<String>,
}

/// What a worker offers right now.
#[derive(Debug, Clone)]
pub struct Offer {
    pub tags: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    /// Indices of GPUs held by the worker's running jobs.
    pub busy_gpus: Vec<u32>,
    pub free_slots: u32,
}

/// The GPUs to give the job (empty for a CPU job), or `None` when it does not
/// fit: no free slot, a required tag missing, or too few free GPUs with
/// enough memory. GPUs are taken lowest index first.
pub fn place(needs: &Needs, offer: &Offer) -> Option<Vec<u32>> {
    if offer.free_slots == 0 {
        return None;
    }
    if !needs.required_tags.iter().all(|t| offer.tags.contains(t)) {
        return None;
    }
    if needs.gpus == 0 {
        return Some(Vec::new());
    }
    let mut free: Vec<u32> = offer
        .gpus
        .iter()
        .filter(|g| g.vram_mb >= needs.min_vram_mb && !offer.busy_gpus.contains(&g.index))
        .map(|g| g.index)
        .collect();
    free.sort_unstable();
    (free.len() >= needs.gpus as usize).then(|| free[..needs.gpus as usize].to_vec())
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
        }
    }

    #[test]
    fn placement_rules() {
        let offer = Offer {
            tags: vec!["cuda12".into(), "a100".into()],
            gpus: vec![gpu(0, 81920), gpu(1, 81920), gpu(2, 24576), gpu(3, 81920)],
            busy_gpus: vec![1],
            free_slots: 2,
        };
        let check = |n: Needs, expected: Option<Vec<u32>>| {
            assert_eq!(place(&n, &offer), expected, "{n:?}");
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
    }

    #[test]
    fn no_free_slot_no_job() {
        let offer = Offer {
            tags: vec![],
            gpus: vec![],
            busy_gpus: vec![],
            free_slots: 0,
        };
        assert_eq!(place(&needs(0, 0, &[]), &offer), None);
        let cpu = Offer {
            free_slots: 1,
            ..offer
        };
        assert_eq!(place(&needs(0, 0, &[]), &cpu), Some(vec![]));
        assert_eq!(place(&needs(1, 0, &[]), &cpu), None);
    }
}
