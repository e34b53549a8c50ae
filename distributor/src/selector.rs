//! Weighted choice of an analyzer, counted in messages.
//!
//! Smooth weighted round-robin (the algorithm of nginx's upstream balancer) generalised to items of
//! different cost: every pick adds `cost × weight / total` credit to each eligible analyzer, gives
//! the item to the one with the most credit, and takes `cost` from it. Credit is conserved among the
//! eligible analyzers, so each one's delivered messages stay within about one item of its exact
//! share at every moment, deterministically (no randomness, nothing to tune).
//!
//! *Eligible* is decided per pick (enabled, healthy, not yet tried for this record), so weights are
//! re-normalised over whoever is available. An analyzer that becomes eligible again starts from
//! zero credit ([`Selector::reset`]): its share resumes from now, it is not flooded to catch up on
//! what it missed (invariant 4).

/// A set of analyzer slots as a bit mask (at most 64 analyzers).
pub type SlotSet = u64;

pub fn slot_bit(slot: usize) -> SlotSet {
    1u64 << slot
}

#[derive(Debug, Clone)]
pub struct Selector {
    weights: Vec<f64>,
    credit: Vec<f64>,
}

impl Selector {
    /// `weights` are relative, ≥ 0; a zero weight is never picked.
    pub fn new(weights: Vec<f64>) -> Self {
        let credit = vec![0.0; weights.len()];
        Self { weights, credit }
    }

    /// The slot that should carry the next item of `cost` messages, among `eligible`; `None` when
    /// no eligible slot has a positive weight.
    pub fn pick(&mut self, eligible: SlotSet, cost: u32) -> Option<usize> {
        let weights = &self.weights;
        let slots: Vec<usize> = (0..weights.len())
            .filter(|&i| eligible & slot_bit(i) != 0 && weights[i] > 0.0)
            .collect();
        let total: f64 = slots.iter().map(|&i| weights[i]).sum();
        if total <= 0.0 {
            return None;
        }
        let cost = f64::from(cost.max(1));
        let mut best: Option<usize> = None;
        for i in slots {
            self.credit[i] += cost * self.weights[i] / total;
            if best.is_none_or(|b| self.credit[i] > self.credit[b]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        self.credit[chosen] -= cost;
        Some(chosen)
    }

    /// Change (or set, for a new slot) a slot's weight. Its credit is kept: a weight change
    /// shifts the shares from now on, without a burst either way.
    pub fn set_weight(&mut self, slot: usize, weight: f64) {
        if slot >= self.weights.len() {
            self.weights.resize(slot + 1, 0.0);
            self.credit.resize(slot + 1, 0.0);
        }
        self.weights[slot] = weight;
    }

    /// Forget a slot's credit: called when it comes back, so it is not flooded to catch up.
    pub fn reset(&mut self, slot: usize) {
        if let Some(c) = self.credit.get_mut(slot) {
            *c = 0.0;
        }
    }

    /// Normalised share of each slot among `eligible` (0 for the others).
    pub fn shares(&self, eligible: SlotSet) -> Vec<f64> {
        let total: f64 = (0..self.weights.len())
            .filter(|&i| eligible & slot_bit(i) != 0)
            .map(|i| self.weights[i])
            .sum();
        (0..self.weights.len())
            .map(|i| {
                if eligible & slot_bit(i) != 0 && total > 0.0 {
                    self.weights[i] / total
                } else {
                    0.0
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: SlotSet = u64::MAX;

    fn run(sel: &mut Selector, eligible: SlotSet, picks: usize, cost: u32) -> Vec<u64> {
        let mut got = vec![0u64; sel.weights.len()];
        for _ in 0..picks {
            got[sel.pick(eligible, cost).unwrap()] += u64::from(cost);
        }
        got
    }

    #[test]
    fn shares_are_exact_over_a_full_cycle() {
        let mut s = Selector::new(vec![0.5, 0.3, 0.2]);
        assert_eq!(run(&mut s, ALL, 10, 1), vec![5, 3, 2]);
        assert_eq!(
            run(&mut s, ALL, 10_000, 50),
            vec![250_000, 150_000, 100_000]
        );
    }

    #[test]
    fn weights_need_not_sum_to_one() {
        let mut s = Selector::new(vec![4.0, 3.0, 2.0, 1.0]);
        assert_eq!(run(&mut s, ALL, 1000, 1), vec![400, 300, 200, 100]);
    }

    #[test]
    fn the_sequence_is_smooth_not_bursty() {
        let mut s = Selector::new(vec![5.0, 1.0, 1.0]);
        let seq: Vec<usize> = (0..7).map(|_| s.pick(ALL, 1).unwrap()).collect();
        assert_eq!(
            seq,
            vec![0, 0, 1, 0, 2, 0, 0],
            "nginx's classic a a b a c a a"
        );
    }

    #[test]
    fn removing_a_slot_renormalises_over_the_rest() {
        let mut s = Selector::new(vec![0.5, 0.3, 0.2]);
        let without_second = ALL & !slot_bit(1);
        let got = run(&mut s, without_second, 7_000, 1);
        assert_eq!(got, vec![5_000, 0, 2_000]);
        assert_eq!(s.shares(without_second), vec![0.5 / 0.7, 0.0, 0.2 / 0.7]);
    }

    #[test]
    fn zero_weights_are_never_picked_and_an_all_zero_set_picks_nothing() {
        let mut s = Selector::new(vec![0.0, 1.0, 0.0]);
        assert_eq!(run(&mut s, ALL, 100, 1), vec![0, 100, 0]);
        assert_eq!(s.pick(slot_bit(0) | slot_bit(2), 1), None);
        assert_eq!(s.pick(0, 1), None);
    }

    #[test]
    fn tiny_weights_still_get_their_exact_share() {
        let mut s = Selector::new(vec![1.0, 1e-3]);
        assert_eq!(run(&mut s, ALL, 1001 * 10, 1), vec![10_000, 10]);
    }

    #[test]
    fn mixed_costs_keep_message_shares_within_one_item() {
        let mut s = Selector::new(vec![0.5, 0.3, 0.2]);
        let mut got = [0u64; 3];
        let mut total = 0u64;
        for i in 0..10_000u32 {
            let cost = 1 + (i * 7919) % 500;
            got[s.pick(ALL, cost).unwrap()] += u64::from(cost);
            total += u64::from(cost);
            for (slot, w) in [0.5, 0.3, 0.2].iter().enumerate() {
                let dev = (got[slot] as f64 - w * total as f64).abs();
                assert!(dev <= 2.0 * 500.0, "slot {slot} off by {dev} messages");
            }
        }
    }

    #[test]
    fn a_weight_change_moves_the_shares_from_then_on() {
        let mut s = Selector::new(vec![0.5, 0.5]);
        assert_eq!(run(&mut s, ALL, 1000, 1), vec![500, 500]);
        s.set_weight(0, 0.8);
        s.set_weight(1, 0.2);
        assert_eq!(run(&mut s, ALL, 1000, 1), vec![800, 200]);
        s.set_weight(2, 1.0);
        let got = run(&mut s, ALL, 2000, 1);
        assert_eq!(got, vec![800, 200, 1000], "a new slot joins at its share");
    }

    #[test]
    fn a_returning_slot_resumes_its_share_from_now_without_catching_up() {
        let mut s = Selector::new(vec![0.5, 0.5]);
        run(&mut s, slot_bit(0), 1000, 1);
        s.reset(1);
        let got = run(&mut s, ALL, 100, 1);
        assert_eq!(got, vec![50, 50]);
    }
}
