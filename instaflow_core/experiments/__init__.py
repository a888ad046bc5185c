"""Problems whose answer is known, run through the same training and sampling code as SD (`gmm`)."""
