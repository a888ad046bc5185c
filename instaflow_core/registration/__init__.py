"""Registration: the domain rules of registering and promoting models (`rules`); MLflow itself is tasks/tracking/."""
