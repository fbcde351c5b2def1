"""Drop-ins for other libraries. Each submodule imports its library lazily, so
``import fedlora`` never pulls in PEFT (or Flower)."""
