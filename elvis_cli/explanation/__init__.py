"""Why an image matched: ELViS's score taken apart into single correspondences and drawn
(`elvis explain`), and the learned functions f and g of a checkpoint."""
