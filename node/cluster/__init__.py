"""What a node does with the rest of the cluster: proposer, presence, ids, membership, webhooks."""
