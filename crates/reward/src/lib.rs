//! Turning text into scalar rewards: reward-model scorers, rule rewards and their combinations.
