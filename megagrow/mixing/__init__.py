"""Data mixing: training-free entropy proxies (`entropy`) and the BiMix law fitted on a few runs (`bimix`)."""
