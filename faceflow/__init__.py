"""faceflow: a Prefect pipeline that learns a generative model of faces."""
