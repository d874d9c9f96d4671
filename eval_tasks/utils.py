"""The local tasks' hooks: lmms-eval's own POPE and MMStar functions, imported as they are (never rewritten), so
that shapes_pope and shapes_mmstar are asked and scored exactly as lmms-eval's pope and mmstar are."""
from lmms_eval.tasks.mmstar.utils import (mmstar_aggregate_results, mmstar_doc_to_text, mmstar_doc_to_visual,
                                          mmstar_process_results)
from lmms_eval.tasks.pope.utils import (pope_aggregate_accuracy, pope_aggregate_f1_score, pope_aggregate_precision,
                                        pope_aggregate_recall, pope_aggregate_yes_ratio, pope_doc_to_text,
                                        pope_doc_to_visual, pope_process_results)

__all__ = ['mmstar_aggregate_results', 'mmstar_doc_to_text', 'mmstar_doc_to_visual', 'mmstar_process_results',
           'pope_aggregate_accuracy', 'pope_aggregate_f1_score', 'pope_aggregate_precision', 'pope_aggregate_recall',
           'pope_aggregate_yes_ratio', 'pope_doc_to_text', 'pope_doc_to_visual', 'pope_process_results']
