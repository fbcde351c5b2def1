"""fedlora on Flower: the ServerApp and ClientApp of this app come from fedlora.integrations.flower."""
