// Saved workflows from before the Super-Resolution node's target became a dynamic combo stored
// [target, width, height, seed, ...] whatever the target; now width and height exist only for "custom", so
// a preset target's old values would land one widget off by two (seed in width's place, and so on). The
// graph data is fixed before the frontend configures it: the two unused numbers of a preset are dropped.
import { app } from "../../scripts/app.js";

const NODE = "MagiHumanSuperResolution";
const OLD_COUNT = 12; // target, width, height, seed, control_after_generate and 7 more (10 for a preset now)

function migrate(nodes) {
  for (const node of nodes ?? []) {
    const values = node.widgets_values;
    if (node.type === NODE && Array.isArray(values) && values.length === OLD_COUNT && values[0] !== "custom") {
      values.splice(1, 2);
    }
  }
}

app.registerExtension({
  name: "MagiHuman.LegacySuperResolutionWidgets",
  beforeConfigureGraph(graph) {
    migrate(graph.nodes);
    for (const subgraph of graph.definitions?.subgraphs ?? []) migrate(subgraph.nodes);
  },
});
