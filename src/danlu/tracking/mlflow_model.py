"""The MLflow pyfunc model of a danlu run (MLflow's models from code): `mlflow.pyfunc.load_model(uri)
.predict(rows)` answers as `danlu.load(run).predict(rows)`. MLflow copies this file into the logged model
and runs it when the model is loaded."""

import mlflow
from mlflow.pyfunc import PythonModel


class DanluRun(PythonModel):
    # predict takes what the run's family takes (rows, image paths, texts): MLflow's type-hint schemas
    # cannot say that, and without this it warns about their absence at every save and load
    _skip_type_hint_validation = True

    def load_context(self, context):
        import danlu

        self.predictor = danlu.load(context.artifacts["run"])

    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input)


mlflow.models.set_model(DanluRun())
