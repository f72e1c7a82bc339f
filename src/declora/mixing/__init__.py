"""Pure mixing maths: topologies and W, live graphs and W_t, churn schedules, the gossip kernel, compression."""
